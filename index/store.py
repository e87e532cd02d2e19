"""The index on disk, versioned, and searching it.

INDEX_DIR/CURRENT              the live version's name, e.g. "v3" (switched by one rename)
INDEX_DIR/v<N>/index.faiss     the FAISS index, CPU-side; FAISS id = row number
INDEX_DIR/v<N>/ids.parquet     row -> image_id, uri, content_hash, live (false: replaced)
INDEX_DIR/v<N>/manifest.json   factory, dim, metric, count, embedder, table and table
                               version indexed, search params, recall@10, build time

A new version is written whole beside the live one, then CURRENT is replaced: a crash
mid-update leaves the previous version live and whole, and a reader opens one version,
never a mix. The previous version is kept (a reader may still have it open); older ones
are removed.

INDEX_DIR may be a URI (s3://, gs://; pyarrow's filesystems, credentials from the
environment). A version is built locally and uploaded whole before CURRENT (one object,
written last) names it; a reader downloads the version CURRENT names once into a local
cache (LAKELENS_CACHE, default ~/.cache/lakelens) and opens it from there, since FAISS
reads local files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from index.build import ivf_of, reconstruct, set_search_params
from index.filtered import FilteredSearch, bitmap
from index.filtered import numpy_search as _numpy_search
from index.idmap import IdMap
from models.errors import LakelensError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
IDS_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()),
                        ("content_hash", pa.string()), ("live", pa.bool_())])


def _replace_into(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


KEEP_VERSIONS = 2


def is_remote(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def _remote(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri.rstrip("/"))
    except (pa.ArrowInvalid, OSError) as e:
        raise LakelensError(f"cannot open index {uri!r}: {e}") from e


def _remote_current(uri: str) -> str:
    fs, root = _remote(uri)
    try:
        with fs.open_input_stream(f"{root}/CURRENT") as f:
            name = f.read().decode().strip()
    except FileNotFoundError as e:
        raise LakelensError(f"{uri} is not a lakelens index: no CURRENT (build one with "
                            "`lakelens index build`)") from e
    if not name.startswith("v") or not name[1:].isdigit():
        raise LakelensError(f"{uri}/CURRENT names {name!r}, which is not a version of this index")
    return name


def cache_root() -> Path:
    return Path(os.environ.get("LAKELENS_CACHE") or Path.home() / ".cache" / "lakelens")


def materialize(uri: str) -> Path:
    """The live version of a remote INDEX_DIR as a local directory (downloaded once)."""
    name = _remote_current(uri)
    base = cache_root() / "index" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    local = base / name
    if (local / "manifest.json").is_file():
        return local
    fs, root = _remote(uri)
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir()
        pafs.copy_files(f"{root}/{name}", str(tmp), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, local)
    except FileNotFoundError as e:
        raise LakelensError(f"{uri}/CURRENT names {name}, which is missing") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("downloaded index %s/%s to %s", uri, name, local)
    for old in sorted((p for p in base.glob("v*") if p.name[1:].isdigit()),
                      key=lambda p: int(p.name[1:]))[:-KEEP_VERSIONS]:
        shutil.rmtree(old, ignore_errors=True)
    return local


def _save_remote(uri: str, index: faiss.Index, ids: pa.Table, manifest: dict, *,
                 keep: int = KEEP_VERSIONS) -> str:
    fs, root = _remote(uri)
    fs.create_dir(root, recursive=True)
    listed = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    versions = sorted(int(i.base_name[1:]) for i in listed
                      if i.type == pafs.FileType.Directory and i.base_name[1:].isdigit()
                      and i.base_name.startswith("v"))
    name = f"v{(versions[-1] if versions else 0) + 1}"
    with tempfile.TemporaryDirectory(prefix="lakelens-index-") as tmp:
        _write_version(Path(tmp) / name, index, ids, manifest, name)
        pafs.copy_files(str(Path(tmp) / name), f"{root}/{name}",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    with fs.open_output_stream(f"{root}/CURRENT") as f:  # one PUT: the switch
        f.write(f"{name}\n".encode())
    for old in versions[: max(0, len(versions) + 1 - keep)]:
        fs.delete_dir(f"{root}/v{old}")
    return name


def exists(path: str | Path) -> bool:
    """Whether INDEX_DIR holds an index (a CURRENT pointer)."""
    if is_remote(path):
        fs, root = _remote(str(path))
        return fs.get_file_info(f"{root}/CURRENT").type == pafs.FileType.File
    return (Path(str(path).removeprefix("file://")) / "CURRENT").is_file()


def current_dir(path: str | Path) -> Path:
    """The live version's directory of INDEX_DIR (a local copy for a remote one)."""
    if is_remote(path):
        return materialize(str(path))
    path = Path(str(path).removeprefix("file://"))
    if not path.is_dir():
        raise LakelensError(f"index {str(path)!r} does not exist (build one with `lakelens index build`)")
    try:
        name = (path / "CURRENT").read_text().strip()
    except FileNotFoundError as e:
        raise LakelensError(f"{path} is not a lakelens index: no CURRENT") from e
    if not name.startswith("v") or not (path / name).is_dir():
        raise LakelensError(f"{path}/CURRENT names {name!r}, which is not a version of this index")
    return path / name


def _versions(path: Path) -> list[int]:
    return sorted(int(p.name[1:]) for p in path.glob("v*") if p.name[1:].isdigit())


def _write_version(directory: Path, index: faiss.Index, ids: pa.Table, manifest: dict,
                   name: str) -> None:
    directory.mkdir(parents=True)
    faiss.write_index(index, str(directory / "index.faiss"))
    pq.write_table(ids.cast(IDS_SCHEMA), directory / "ids.parquet")
    text = json.dumps({**manifest, "version": name, "format_version": FORMAT_VERSION},
                      indent=2) + "\n"
    (directory / "manifest.json").write_text(text)


def save(path: str | Path, index: faiss.Index, ids: pa.Table, manifest: dict, *,
         keep: int = KEEP_VERSIONS) -> str:
    """Write a new version (index, ids, then manifest), then switch CURRENT to it with one
    atomic rename (on an object store: one PUT, after the version is uploaded whole), and
    delete all but the `keep` newest versions (1: erasure, no earlier version survives).
    Returns the new version's name ("v<N>")."""
    if index.ntotal != ids.num_rows:
        raise AssertionError(f"index has {index.ntotal} vectors but ids has {ids.num_rows} rows")
    if is_remote(path):
        return _save_remote(str(path), index, ids, manifest, keep=keep)
    path = Path(str(path).removeprefix("file://"))
    path.mkdir(parents=True, exist_ok=True)
    versions = _versions(path)
    name = f"v{(versions[-1] if versions else 0) + 1}"
    tmp_dir = path / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _write_version(tmp_dir, index, ids, manifest, name)
        os.replace(tmp_dir, path / name)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    _replace_into(path / "CURRENT", lambda tmp: Path(tmp).write_text(name + "\n"))
    for old in _versions(path)[:-keep]:
        shutil.rmtree(path / f"v{old}", ignore_errors=True)
    return name


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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LakelensError(f"{path} has index format {manifest.get('format_version')}; this "
                            f"lakelens reads {FORMAT_VERSION}")
    return manifest


@dataclass(frozen=True)
class Neighbors:
    """Per query, ranked: scores (inner product, or squared L2 distance), rows, ids, uris."""

    scores: list[np.ndarray]
    rows: list[np.ndarray]
    image_ids: list[list[str]]
    uris: list[list[str]]

    def as_json(self) -> list[list[dict]]:
        return [[{"rank": r + 1, "score": float(s), "image_id": i, "uri": u}
                 for r, (s, i, u) in enumerate(zip(sc, ids, uris, strict=True))]
                for sc, ids, uris in zip(self.scores, self.image_ids, self.uris, strict=True)]


class SimilarityIndex:
    """An index opened from disk: search by vectors, image files or image ids. The index
    file is memory-mapped where FAISS can (IVF inverted lists); the id map stays Arrow."""

    def __init__(self, path: str | Path, *, mmap: bool = False):
        self.root = path if is_remote(path) else Path(path)
        self.path = current_dir(path)
        self.manifest = load_manifest(self.path)
        self.mmapped = False
        try:
            self.index = None
            if mmap:
                try:
                    self.index = faiss.read_index(str(self.path / "index.faiss"),
                                                  faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
                    self.mmapped = True
                except RuntimeError:  # an index type FAISS cannot map: read it whole
                    self.index = None
            if self.index is None:
                self.index = faiss.read_index(str(self.path / "index.faiss"))
            ids = pq.read_table(self.path / "ids.parquet")
        except (RuntimeError, OSError, pa.ArrowInvalid) as e:
            first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            raise LakelensError(f"index {str(self.path)!r} is corrupt or incomplete: {first}") from e
        if ids.num_rows != self.index.ntotal:
            raise LakelensError(f"index {str(self.path)!r} is inconsistent: {self.index.ntotal} "
                                f"vectors but {ids.num_rows} id rows")
        self.live = np.asarray(ids.column("live").to_numpy(zero_copy_only=False), dtype=bool)
        self.ids = IdMap(ids.column("image_id"), ids.column("uri"), self.live)
        self._live_count = int(self.live.sum())
        self._ivf = ivf_of(self.index)
        set_search_params(self.index, self.manifest.get("search_params", {}))
        self._params = search_parameters(self.index, self.manifest.get("search_params", {}),
                                         self.live)
        self._filtered = FilteredSearch(self.index)

    def live_count(self) -> int:
        return self._live_count

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return self.live_count()

    def row(self, image_id: str) -> int | None:
        """The live row of image_id, or None."""
        return self.ids.row(image_id)

    def live_image_ids(self) -> list[str]:
        return self.ids.image_ids.filter(pa.array(self.live)).to_pylist()

    def uri(self, row: int) -> str:
        return self.ids.uris[row].as_py()

    def search(self, vectors: np.ndarray, k: int = 10, *, allow: np.ndarray | None = None,
               nprobe: int | None = None) -> Neighbors:
        """Nearest live images of each vector (float32[q, dim] or [dim]).

        `allow` keeps only some rows, inside the search: None (every live row), a bool mask
        of one entry per row (len == ntotal), or the allowed row numbers (int, sorted,
        unique; a posting list, which costs what it holds rather than what the index holds).
        Dead rows stay excluded either way; every hit returned is an allowed live row, and a
        filter keeping fewer than k such rows returns exactly those. A selective filter is
        answered from the allowed rows' own stored codes (see index/filtered.py), so its
        recall holds as the filter narrows. `nprobe` overrides the tuned value (for a
        filtered search: the unfiltered value the filter's selectivity scales up)."""
        if k <= 0:
            raise LakelensError(f"k must be >= 1, got {k}")
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise LakelensError(f"query vectors have shape {tuple(np.shape(vectors))}; this "
                                f"index holds dim {self.dim}")
        if not np.isfinite(x).all():
            raise LakelensError("query vectors hold NaN or infinite values")
        x = np.ascontiguousarray(x)
        fetch = min(k, self.index.ntotal)
        rows = None if allow is None else self.allowed_rows(allow)
        mask = allow if rows is not None and np.asarray(allow).dtype == np.bool_ else None
        if fetch == 0 or self._live_count == 0 or (rows is not None and len(rows) == 0):
            empty = [np.zeros(0, np.float32) for _ in x]
            return Neighbors(empty, [np.zeros(0, np.int64) for _ in x], [[] for _ in x], [[] for _ in x])
        if rows is None:  # per query batch nothing here may cost O(rows of the index)
            params = self._params
            if nprobe is not None:
                tuned = {**self.manifest.get("search_params", {}), "nprobe": int(nprobe)}
                params = search_parameters(self.index, tuned, self.live, always=True)
            scores, found = _numpy_search(self.index)(x, fetch, params=params)
            member = self.live
        else:
            scores, found = self._search_filtered(x, fetch, rows, nprobe, mask)
            member = None
        out_s, out_r = [], []
        for s, r in zip(scores, found, strict=True):
            ok = (r >= 0)
            if member is not None:
                ok[ok] &= member[r[ok]]
            else:  # exactly the allowed live rows, whatever the plan returned
                at = np.minimum(np.searchsorted(rows, r), len(rows) - 1)
                ok &= rows[at] == r
            out_s.append(s[ok][:k])
            out_r.append(r[ok][:k])
        ids, uris = self.ids.image_ids, self.ids.uris
        return Neighbors(out_s, out_r, [ids.take(pa.array(r)).to_pylist() for r in out_r],
                         [uris.take(pa.array(r)).to_pylist() for r in out_r])

    def allowed_rows(self, allow: np.ndarray) -> np.ndarray:
        """The live rows `allow` keeps (int64, sorted): from a bool mask of ntotal entries,
        or from sorted unique row numbers. A LakelensError names a malformed filter."""
        a = np.asarray(allow)
        total = self.index.ntotal
        if a.dtype == np.bool_:
            if a.shape != (total,):
                raise LakelensError(f"allow mask has shape {a.shape}; this index has {total} rows "
                                    "(pass a bool per row, or the allowed row numbers)")
            return np.flatnonzero(a & self.live)
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
            raise LakelensError(f"allow must be a bool mask of {total} rows or a 1-d array of "
                                f"row numbers, got {a.dtype} of shape {a.shape}")
        a = a.astype(np.int64, copy=False)
        if a.size and (a[0] < 0 or a[-1] >= total or not (a[1:] > a[:-1]).all()):
            raise LakelensError(f"allow rows must be sorted, unique row numbers in 0..{total - 1}")
        return a[self.live[a]] if self._live_count < total else a

    def _search_filtered(self, x: np.ndarray, fetch: int, rows: np.ndarray, nprobe: int | None,
                         mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the `fetch` nearest of `rows` (allowed, live) per query, by
        the plan FilteredSearch picks; rows past the hits found are -1. mask: the caller's
        bool mask, if it gave one (its bitmap costs less than one made from rows)."""
        tuned = dict(self.manifest.get("search_params", {}))
        if nprobe is not None:
            tuned["nprobe"] = int(nprobe)
        ivf = self._ivf
        plan = self._filtered.plan(len(rows), tuned.get("nprobe", ivf.nprobe if ivf else None))
        logger.debug("filtered search: %d allowed rows, %s plan", len(rows), plan)
        if plan.kind == "exact":
            return self._filtered.search_exact(x, fetch, rows)
        if plan.kind == "lists":
            return self._filtered.search_lists(x, fetch, rows, plan.nprobe)
        bits = (np.packbits(np.asarray(mask) & self.live, bitorder="little") if mask is not None
                else bitmap(rows, self.index.ntotal))
        if plan.nprobe is not None:
            tuned["nprobe"] = plan.nprobe
        refine = faiss.downcast_index(self.index)
        if isinstance(refine, faiss.IndexRefine):
            tuned["k_factor"] = float(tuned.get("k_factor", refine.k_factor)) * plan.shortlist
        while True:
            params = _selector_parameters(self.index, tuned, bits, self.index.ntotal)
            scores, found = _numpy_search(self.index)(x, fetch, params=params)
            if ivf is None:
                return scores, found
            short = ((found >= 0).sum(axis=1) < min(fetch, len(rows))).any()
            probed = int(tuned.get("nprobe", ivf.nprobe))
            if not short or probed >= ivf.nlist:
                return scores, found
            # a selective filter left too few hits in the probed lists: probe more
            tuned["nprobe"] = min(ivf.nlist, max(1, probed) * 4)

    def rows_of_ids(self, image_ids: list[str]) -> np.ndarray:
        """Live rows of image_ids; a LakelensError names the first that is not indexed."""
        rows = self.ids.rows_of(pa.array(image_ids, pa.string()))
        missing = [image_ids[i] for i in np.flatnonzero(rows < 0)]
        if missing:
            raise LakelensError(f"image_id {missing[0]!r} is not in this index"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return rows

    def vectors_of(self, image_ids: list[str]) -> np.ndarray:
        return reconstruct(self.index, self.rows_of_ids(image_ids))

    def search_ids(self, image_ids: list[str], k: int = 10, **kw) -> Neighbors:
        """Neighbours of images already in the index, by image_id."""
        return self.search(self.vectors_of(image_ids), k, **kw)

    def search_images(self, paths: list[str], k: int = 10, *, weights: str | None = None) -> Neighbors:
        """Neighbours of image files, embedded with the index's own embedder."""
        from index.embed import embed_files

        return self.search(embed_files(paths, self.manifest["embedder"], weights=weights), k)


def open_index(path: str | Path, *, mmap: bool = False) -> SimilarityIndex:
    """Open INDEX_DIR for searching. Raises LakelensError for a missing or corrupt index."""
    return SimilarityIndex(path, mmap=mmap)


def search_parameters(index: faiss.Index, params: dict, live: np.ndarray, *, always: bool = False):
    """FAISS search parameters that exclude dead (or filtered) rows inside the search (an
    ID selector: k hits come back without fetching k + excluded), or None when every row
    is live (unless `always`: parameters such as nprobe are wanted anyway)."""
    if live.all() and not always:
        return None
    return _selector_parameters(index, params, np.packbits(live, bitorder="little"), len(live))


def _selector_parameters(index: faiss.Index, params: dict, bits: np.ndarray, n: int):
    sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
    sel.referenced_objects = [bits]  # the C++ selector holds a raw pointer to the bits
    down = faiss.downcast_index(index)
    if isinstance(down, faiss.IndexRefine):
        base = _ivf_params(faiss.downcast_index(down.base_index), params, sel)
        p = faiss.IndexRefineSearchParameters(sel=sel, base_index_params=base)
        p.k_factor = float(params.get("k_factor", down.k_factor))
        p._keep = (sel, base, bits)  # the C++ side holds raw pointers
        return p
    return _ivf_params(down, params, sel)


def _ivf_params(index: faiss.Index, params: dict, sel):
    if isinstance(index, faiss.IndexIVF):
        nprobe = int(params.get("nprobe", index.nprobe))
        p = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        quantizer = faiss.downcast_index(index.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):  # the graph walk must reach nprobe lists
            ef = max(int(params.get("quantizer_efSearch", quantizer.hnsw.efSearch)), 2 * nprobe)
            p.quantizer_params = q = faiss.SearchParametersHNSW(efSearch=ef)
            p._keep = (sel, q)
            return p
    else:
        p = faiss.SearchParameters(sel=sel)
    p._keep = sel
    return p
