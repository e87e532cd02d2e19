"""The index on disk: immutable segments, versions that list them, and CURRENT.

INDEX_DIR/CURRENT                    the live version's name, e.g. "v7-3fa9c2d1"
INDEX_DIR/v<N>-<hex>/manifest.json   factory, dim, metric, count, embedder, table version,
                                     search params, recall@10, and the segments, in row order
INDEX_DIR/v<N>-<hex>/live.bits       one bit per row (little-endian packbits); 0: a replaced
                                     or removed image's row. Absent: every row is live.
INDEX_DIR/segments/<id>/index.faiss  the first segment: a FAISS index over rows 0..n-1
INDEX_DIR/segments/<id>/vectors.f32  a later segment (an update): its rows' vectors, added
                                     to the index as rows start... when a reader opens it
INDEX_DIR/segments/<id>/ids-*.parquet  row -> image_id, uri, content_hash, in row order (one
                                     file per build shard; never gathered in one object)
INDEX_DIR/segments/<id>/trained.faiss  the trained, empty index (a full build's segment):
                                     what a later update encodes its new vectors with

A build writes one segment; an update writes one small segment with the night's vectors
and a new live.bits, never rewriting or even reading the segments before it (FAISS 1.15
cannot append one fast-scan index to another without corrupting memory, so a reader
encodes a later segment's vectors into the first one's lists when it opens the version:
the same lists as adding them in one process). A version directory is
written whole, its files and the directory fsynced, then CURRENT is switched: one atomic
rename locally (fsynced), one conditional PUT on S3 (If-Match the CURRENT read when the
write began, so of two writers one fails instead of both switching). A name carries a
random suffix, so two writers can never pick the same directory. Versions past `keep`
and segments no kept version lists are deleted.

Versions written before segments (v<N>/index.faiss + ids.parquet with a `live` column)
are still read.

INDEX_DIR may be a URI (s3://, gs://; pyarrow's filesystems, credentials from the
environment). A reader downloads the version CURRENT names and its segments into a local
cache (LAKELENS_CACHE, default ~/.cache/lakelens) once each (segments never change, so a
nightly update downloads only the new one), since FAISS reads local files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from index.objects import Conflict, object_at
from index.shards import add_rows
from models.errors import LakelensError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: one index.faiss + ids.parquet (with `live`) per version directory
READS_FORMATS = (1, 2)
KEEP_VERSIONS = 2
IDS_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("content_hash", pa.string())])
SEGMENTS = "segments"
VECTORS = "vectors.f32"  # a later segment: its rows' vectors, raw float32[rows, dim]
FIRST_IDS = "ids-00000.parquet"
_NAME = re.compile(r"^v(\d+)(-[0-9a-f]{8})?$")


def is_remote(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def _local(path: str | Path) -> Path:
    return Path(str(path).removeprefix("file://"))


def _remote(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri.rstrip("/"))
    except (pa.ArrowInvalid, OSError) as e:
        raise LakelensError(f"cannot open index {uri!r}: {e}") from e


def version_number(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def new_version_name(previous: str | None) -> str:
    n = (version_number(previous) or 0) if previous else 0
    return f"v{n + 1}-{uuid.uuid4().hex[:8]}"


# -- reading CURRENT ------------------------------------------------------------------------

def read_current(path: str | Path) -> str | None:
    """The version name INDEX_DIR/CURRENT holds, or None when there is none."""
    if is_remote(path):
        now = object_at(f"{str(path).rstrip('/')}/CURRENT").read()
        name = now.data.decode().strip() if now is not None else None
    else:
        try:
            name = (_local(path) / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return None
    if name is not None and version_number(name) is None:
        raise LakelensError(f"{path}/CURRENT names {name!r}, which is not a version of this index")
    return name


def current_name(path: str | Path) -> str:
    """The name CURRENT holds: one small file (one object) read, nothing opened or
    downloaded. A watcher polls this and opens a version only when it changes."""
    name = read_current(path)
    if name is None:
        raise LakelensError(f"{path} is not a lakelens index: no CURRENT")
    return name


def exists(path: str | Path) -> bool:
    """Whether INDEX_DIR holds an index (a CURRENT pointer)."""
    return read_current(path) is not None


def cache_root() -> Path:
    return Path(os.environ.get("LAKELENS_CACHE") or Path.home() / ".cache" / "lakelens")


def current_dir(path: str | Path) -> Path:
    """The live version's directory of INDEX_DIR (a local copy, segments included, for a
    remote one)."""
    if is_remote(path):
        return materialize(str(path))
    root = _local(path)
    if not root.is_dir():
        raise LakelensError(f"index {str(root)!r} does not exist (build one with `lakelens index build`)")
    name = read_current(root)
    if name is None:
        raise LakelensError(f"{root} is not a lakelens index: no CURRENT")
    if not (root / name).is_dir():
        raise LakelensError(f"{root}/CURRENT names {name!r}, which is not a version of this index")
    return root / name


def materialize(uri: str) -> Path:
    """The live version of a remote INDEX_DIR as a local directory: the version and each
    segment it lists are downloaded once (they never change)."""
    name = read_current(uri)
    if name is None:
        raise LakelensError(f"{uri} is not a lakelens index: no CURRENT (build one with "
                            "`lakelens index build`)")
    base = cache_root() / "index" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    fs, root = _remote(uri)
    local = base / name
    try:
        _download(fs, f"{root}/{name}", local)
        for seg in json.loads((local / "manifest.json").read_text()).get("segments", []):
            _download(fs, f"{root}/{seg['dir']}", base / seg["dir"])
    except FileNotFoundError as e:
        raise LakelensError(f"{uri}/CURRENT names {name}, which is missing or incomplete") from e
    kept = sorted((p for p in base.glob("v*") if version_number(p.name) is not None),
                  key=lambda p: version_number(p.name))[-KEEP_VERSIONS:]
    _collect(base, {p.name for p in kept}, keep=KEEP_VERSIONS)
    return local


def _download(fs: pafs.FileSystem, src: str, dest: Path) -> None:
    if dest.is_dir():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir()
        pafs.copy_files(src, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("downloaded %s to %s", src, dest)


def load_manifest(path: str | Path) -> dict:
    """The live version's manifest of INDEX_DIR (or of a version directory)."""
    if is_remote(path):
        path = current_dir(path)
    path = Path(path)
    if not (path / "manifest.json").exists():
        path = current_dir(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError as e:
        raise LakelensError(f"{path} is not a lakelens index: no manifest.json") from e
    except json.JSONDecodeError as e:
        raise LakelensError(f"{path}/manifest.json is corrupt: {e}") from e
    if manifest.get("format_version") not in READS_FORMATS:
        raise LakelensError(f"{path} has index format {manifest.get('format_version')}; this "
                            f"lakelens reads {', '.join(map(str, READS_FORMATS))}")
    return manifest


# -- reading a version ----------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    dir: str  # relative to INDEX_DIR: "segments/<id>"
    start: int  # first row
    rows: int
    id_files: tuple[str, ...]  # in row order, relative to the segment's directory

    def as_json(self) -> dict:
        return {"dir": self.dir, "start": self.start, "rows": self.rows, "id_files": list(self.id_files)}

    @staticmethod
    def of(d: dict) -> Segment:
        return Segment(d["dir"], int(d["start"]), int(d["rows"]), tuple(d["id_files"]))


def segments_of(manifest: dict) -> list[Segment]:
    return [Segment.of(s) for s in manifest.get("segments", [])]


def root_of(version_dir: Path) -> Path:
    return version_dir.parent


def read_live(version_dir: Path, rows: int) -> np.ndarray:
    """bool[rows]: which rows are live in this version."""
    bits_path = version_dir / "live.bits"
    if not bits_path.exists():
        if (version_dir / "ids.parquet").exists():  # format 1
            live = pq.read_table(version_dir / "ids.parquet", columns=["live"]).column("live")
            return np.asarray(live.to_numpy(), dtype=bool)
        return np.ones(rows, bool)
    bits = np.fromfile(bits_path, dtype=np.uint8)
    return np.unpackbits(bits, count=rows, bitorder="little").astype(bool)


def id_files(version_dir: Path, manifest: dict) -> list[Path]:
    """The id map's files of a version, in row order."""
    if "segments" not in manifest:
        return [version_dir / "ids.parquet"]
    root = root_of(version_dir)
    return [root / s.dir / f for s in segments_of(manifest) for f in s.id_files]


def read_ids(version_dir: Path, manifest: dict, columns: list[str] | None = None) -> pa.Table:
    """The id map (image_id, uri, content_hash) of a version, row order, as one Arrow table."""
    cols = columns or IDS_SCHEMA.names
    tables = [pq.read_table(f, columns=cols) for f in id_files(version_dir, manifest)]
    return pa.concat_tables(tables) if tables else IDS_SCHEMA.empty_table().select(cols)


def scan_ids(version_dir: Path, manifest: dict, columns: list[str],
             batch_rows: int = 65_536) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row, batch) over the id map in row order, never all of it at once."""
    at = 0
    for f in id_files(version_dir, manifest):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
            yield at, batch
            at += batch.num_rows


def read_index(version_dir: Path, manifest: dict, *, mmap: bool = False) -> tuple[faiss.Index, bool]:
    """The version's FAISS index with every segment's rows, in row order; (index,
    memory-mapped). The first segment is an index file (memory-mapped where FAISS can,
    when asked and nothing is added); each later one holds the night's vectors, added
    here as rows start... exactly as one process adding every row in order would."""
    if "segments" not in manifest:
        first, later, root = version_dir / "index.faiss", [], version_dir
    else:
        root = root_of(version_dir)
        segs = segments_of(manifest)
        first, later = root / segs[0].dir / "index.faiss", segs[1:]
    index, mapped = None, False
    if mmap and not later:
        try:
            index = faiss.read_index(str(first), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            mapped = True
        except RuntimeError:  # an index type FAISS cannot map: read it whole
            index = None
    if index is None:
        index = faiss.read_index(str(first))
    for seg in later:
        x = np.memmap(root / seg.dir / VECTORS, dtype=np.float32, mode="r").reshape(seg.rows, index.d)
        for at in range(0, len(x), 65_536):
            add_rows(index, x[at:at + 65_536], seg.start + at)
    return index, mapped


# -- writing -------------------------------------------------------------------------------

def _fsync_tree(directory: Path) -> None:
    for p in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer:
    """Writes one new version of INDEX_DIR: segments (locally staged, uploaded whole for a
    remote index), then commit() switches CURRENT. Take the index lock around it."""

    def __init__(self, path: str | Path):
        self.path = path
        self.remote = is_remote(path)
        self.previous = read_current(path)
        self._tag = object_at(f"{str(path).rstrip('/')}/CURRENT").read() if self.remote else None
        if self.remote:
            self._stage = Path(tempfile.mkdtemp(prefix="lakelens-index-"))
            self.root = self._stage
        else:
            self._stage = None
            self.root = _local(path)
            self.root.mkdir(parents=True, exist_ok=True)
        self.segments: list[str] = []

    def new_segment(self) -> tuple[str, Path]:
        """(relative dir, local directory) of a new, empty segment."""
        rel = f"{SEGMENTS}/{uuid.uuid4().hex[:16]}"
        local = self.root / rel
        local.mkdir(parents=True)
        self.segments.append(rel)
        return rel, local

    def write_segment(self, index: faiss.Index | np.ndarray, ids: pa.Table | list[pa.Table], *,
                      start: int, trained: faiss.Index | None = None) -> Segment:
        """A segment of rows start...: a FAISS index (the first segment) or the vectors of
        a later one (float32[rows, dim]), and its id map."""
        rel, local = self.new_segment()
        names = []
        for n, t in enumerate(ids if isinstance(ids, list) else [ids]):
            names.append(f"ids-{n:05d}.parquet")
            pq.write_table(t.select(IDS_SCHEMA.names).cast(IDS_SCHEMA), local / names[-1])
        if isinstance(index, np.ndarray):
            np.ascontiguousarray(index, dtype=np.float32).tofile(local / VECTORS)
            rows = len(index)
        else:
            faiss.write_index(index, str(local / "index.faiss"))
            rows = int(index.ntotal)
        if trained is not None:
            faiss.write_index(trained, str(local / "trained.faiss"))
        return Segment(rel, start, rows, tuple(names))

    def commit(self, manifest: dict, segments: list[Segment], live: np.ndarray | None, *,
               keep: int = KEEP_VERSIONS) -> str:
        """Write the version (manifest naming `segments`, live bits unless all rows are live),
        fsync it, switch CURRENT; delete versions past `keep` and unlisted segments.
        Returns the version's name."""
        name = new_version_name(self.previous)
        rows = sum(s.rows for s in segments)
        if live is not None and len(live) != rows:
            raise AssertionError(f"live has {len(live)} rows, the segments {rows}")
        stage = self.root / f".{name}.tmp"
        stage.mkdir()
        if live is not None and not live.all():
            np.packbits(live, bitorder="little").tofile(stage / "live.bits")
        text = json.dumps({**manifest, "version": name, "format_version": FORMAT_VERSION,
                           "segments": [s.as_json() for s in segments]}, indent=2) + "\n"
        (stage / "manifest.json").write_text(text)
        if self.remote:
            os.replace(stage, self.root / name)
            self._upload(name)
        else:
            for rel in self.segments:
                _fsync_tree(self.root / rel)
            _fsync_tree(stage)
            os.replace(stage, self.root / name)
            _fsync_dir(self.root)
            _switch_local(self.root, name)
            _collect(self.root, {name}, keep=keep)
        logger.info("index %s: version %s (%d rows in %d segments)", self.path, name, rows, len(segments))
        return name

    def _upload(self, name: str) -> None:
        fs, root = _remote(str(self.path))
        local_fs = pafs.LocalFileSystem()
        for rel in [*self.segments, name]:
            pafs.copy_files(str(self.root / rel), f"{root}/{rel}", source_filesystem=local_fs,
                            destination_filesystem=fs)
        current = object_at(f"{str(self.path).rstrip('/')}/CURRENT")
        data = f"{name}\n".encode()
        try:  # the switch: one conditional PUT against the CURRENT this write began from
            current.create(data) if self._tag is None else current.replace(data, self._tag.tag)
        except Conflict as e:
            for rel in [name, *self.segments]:  # ours, never switched in: not left behind
                fs.delete_dir(f"{root}/{rel}")
            raise LakelensError(f"{self.path}/CURRENT changed while this version was written (another "
                                f"index writer?); {name} was uploaded but not switched in") from e
        _collect_remote(fs, root, name)

    def discard(self, rel: str) -> None:
        """Drop a segment this writer staged (it will not be part of the version)."""
        shutil.rmtree(self.root / rel, ignore_errors=True)
        self.segments.remove(rel)

    def abort(self) -> None:
        """Remove what this writer staged (segments of a version never committed)."""
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            return
        for rel in self.segments:
            shutil.rmtree(self.root / rel, ignore_errors=True)

    def close(self) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)


def _switch_local(root: Path, name: str) -> None:
    tmp = root / f".CURRENT.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / "CURRENT")
        _fsync_dir(root)
    finally:
        if tmp.exists():
            tmp.unlink()


def _listed_segments(manifest_path: Path) -> set[str]:
    try:
        return {s["dir"] for s in json.loads(manifest_path.read_text()).get("segments", [])}
    except (OSError, json.JSONDecodeError):
        return set()


def _kept(versions: list[str], current: set[str], keep: int) -> set[str]:
    """Of the sorted version names, those to keep: `current` and the keep - 1 newest before
    it (one numbered past it was left by a writer stopped before its switch)."""
    newest = max(version_number(c) or 0 for c in current)
    before = [v for v in versions if version_number(v) < newest]
    return (set(before[-(keep - 1):]) if keep > 1 else set()) | current


def _collect(root: Path, current: set[str], *, keep: int) -> None:
    """Delete versions past the `keep` newest (those in `current` always kept), segments no
    kept version lists, and staging left by a killed writer."""
    versions = sorted((p for p in root.iterdir() if p.is_dir() and version_number(p.name) is not None),
                      key=lambda p: version_number(p.name))
    kept = _kept([p.name for p in versions], current, keep)
    listed: set[str] = set()
    for p in versions:
        if p.name in kept:
            listed |= _listed_segments(p / "manifest.json")
        else:
            shutil.rmtree(p, ignore_errors=True)
    seg_root = root / SEGMENTS
    if seg_root.is_dir():
        for seg in seg_root.iterdir():
            if f"{SEGMENTS}/{seg.name}" not in listed:
                shutil.rmtree(seg, ignore_errors=True)
    for tmp in root.glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _collect_remote(fs: pafs.FileSystem, root: str, current: str, *, keep: int = KEEP_VERSIONS) -> None:
    listed_info = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    versions = sorted((i.base_name for i in listed_info if i.type == pafs.FileType.Directory
                       and version_number(i.base_name) is not None), key=version_number)
    kept = _kept(versions, {current}, keep)
    listed: set[str] = set()
    for v in versions:
        if v not in kept:
            fs.delete_dir(f"{root}/{v}")
            continue
        try:
            with fs.open_input_stream(f"{root}/{v}/manifest.json") as f:
                listed |= {s["dir"] for s in json.loads(f.read()).get("segments", [])}
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    segs = fs.get_file_info(pafs.FileSelector(f"{root}/{SEGMENTS}", allow_not_found=True))
    for info in segs:
        if info.type == pafs.FileType.Directory and f"{SEGMENTS}/{info.base_name}" not in listed:
            fs.delete_dir(info.path)


def save(path: str | Path, index: faiss.Index, ids: pa.Table, manifest: dict, *,
         keep: int = KEEP_VERSIONS, live: np.ndarray | None = None,
         trained: faiss.Index | None = None) -> str:
    """Write `index` and its id map (image_id, uri, content_hash; `live` per row as an
    argument or a column) as a new version of one segment and switch CURRENT to it; all
    but the `keep` newest versions are deleted (1: erasure, no earlier version survives).
    Returns the version's name."""
    if index.ntotal != ids.num_rows:
        raise AssertionError(f"index has {index.ntotal} vectors but ids has {ids.num_rows} rows")
    if live is None and "live" in ids.column_names:  # the id map of format 1 carried it
        live = np.asarray(ids.column("live").to_numpy(zero_copy_only=False), dtype=bool)
    writer = Writer(path)
    try:
        seg = writer.write_segment(index, ids, start=0, trained=trained)
        return writer.commit(manifest, [seg], live, keep=keep)
    except BaseException:
        writer.abort()
        raise
    finally:
        writer.close()
