"""SOURCE arguments: what to list, how to list a piece of it, and reading bytes. No Ray.

A source is a local directory (recursive), a glob, a single image, a manifest (``.txt``/
``.lst``: one URI per line, ``#`` comments; ``.parquet``: a ``uri`` or ``path`` column, or
S3 Inventory's ``bucket`` + ``key``, with optional ``size``, ``last_modified_date`` /
``mtime_ns`` and ``e_tag`` / ``etag``), or a pyarrow/fsspec URI (``s3://``, ``gs://``,
``file://``, ...) to any of those. Directories and globs keep files with an image
extension (case-insensitive) and count the rest by extension; manifests are taken as
they are, so a listed non-image becomes an error row.

The driver only plans (`plan_sources`: which directories to list, which manifests to
read); the listing itself runs in Ray tasks (pipelines.lake.listing), one batch of at
most LIST_BATCH entries at a time, so no process holds every URI of the lake.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from models.decode import IMAGE_EXTENSIONS
from models.errors import LakelensError

logger = logging.getLogger(__name__)

TEXT_MANIFESTS = (".txt", ".lst")
GLOB_CHARS = set("*?[")
LIST_BATCH = 10_000
SPREAD_DEPTH = 2  # directory levels the driver expands so that listing tasks share the tree
LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                            ("etag", pa.string()), ("is_image", pa.bool_())])


@dataclass(frozen=True)
class SourcePlan:
    """What the listing tasks do: each entry is small; the URIs themselves are not here."""

    dirs: list[tuple[str, bool]] = field(default_factory=list)  # (dir or prefix, recursive)
    text_manifests: list[str] = field(default_factory=list)
    parquet_manifests: list[str] = field(default_factory=list)
    globs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def is_image_name(name: str) -> bool:
    return extension(name) in IMAGE_EXTENSIONS


def extension(name: str) -> str:
    ext = os.path.splitext(name.rsplit("/", 1)[-1])[1].lower()
    return ext or "(none)"


def image_id(uri: str) -> str:
    """Stable id of a source object: the first 32 hex digits of sha256(canonical URI)."""
    return hashlib.sha256(uri.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def bucket_of(iid: str, buckets: int) -> int:
    """The table partition of an image id (crc32: fast, uniform, stable across versions)."""
    return zlib.crc32(iid.encode()) % buckets


def fingerprint(size: int | None, mtime_ns: int | None, etag: str | None) -> str | None:
    """A cheap change detector: the ETag when the store gives one, else size and mtime."""
    if etag:
        return f"etag:{etag.strip(chr(34))}"
    if size is None:
        return None
    return f"{size}:{mtime_ns if mtime_ns is not None else '-'}"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def canonical(uri: str) -> str:
    """Absolute local path (symlinks kept as named), or the URI as given."""
    if is_remote(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


@functools.lru_cache(maxsize=16)
def _filesystem(prefix: str) -> pafs.FileSystem:
    """A filesystem for `scheme://netloc`, pyarrow's own or fsspec's."""
    try:
        fs, _ = pafs.FileSystem.from_uri(prefix + "/")
        return fs
    except Exception as first:
        try:
            import fsspec

            proto = prefix.split("://", 1)[0]
            return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(proto)))
        except Exception:
            raise LakelensError(f"cannot open {prefix!r}: {first}") from first


def split_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    scheme, rest = uri.split("://", 1)
    netloc = rest.split("/", 1)[0]
    fs = _filesystem(f"{scheme}://{netloc}")
    if isinstance(fs, pafs.PyFileSystem):
        return fs, uri
    _, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def read_bytes(uri: str) -> bytes:
    """The object's bytes. Raises OSError (FileNotFoundError, PermissionError, ...)."""
    if not is_remote(uri):
        with open(uri, "rb") as f:
            return f.read()
    fs, path = split_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


# -- planning (driver) ------------------------------------------------------------------

def plan_sources(sources: Sequence[str]) -> SourcePlan:
    """Check every source exists and split the work; raises LakelensError otherwise."""
    if not sources:
        raise LakelensError("no SOURCE given; pass a directory, glob, manifest or URI")
    plan = SourcePlan()
    for source in sources:
        _plan_one(source, plan)
    return plan


def _plan_one(source: str, plan: SourcePlan) -> None:
    lower = source.lower()
    if is_remote(source):
        fs, path = split_uri(source)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise LakelensError(f"SOURCE {source!r} does not exist")
        if info.type == pafs.FileType.Directory:
            plan.dirs.extend(_spread(source))
        elif lower.endswith(".parquet"):
            plan.parquet_manifests.append(_check_parquet_manifest(source))
        elif lower.endswith(TEXT_MANIFESTS):
            plan.text_manifests.append(source)
        else:
            plan.files.append(source)
        return
    path = canonical(source)
    if GLOB_CHARS & set(source) and not os.path.lexists(path):
        plan.globs.append(os.path.expanduser(source))
    elif os.path.isdir(path):
        plan.dirs.extend(_spread(path))
    elif os.path.lexists(path):
        if lower.endswith(".parquet"):
            plan.parquet_manifests.append(_check_parquet_manifest(path))
        elif lower.endswith(TEXT_MANIFESTS):
            plan.text_manifests.append(path)
        else:
            plan.files.append(path)  # a single file, named on purpose: an image or an error row
    else:
        raise LakelensError(f"SOURCE {source!r} does not exist")


def _check_parquet_manifest(uri: str) -> str:
    fs, path = split_uri(uri) if is_remote(uri) else (None, uri)
    try:
        names = pq.read_schema(path, filesystem=fs).names
    except (OSError, pa.ArrowInvalid) as e:
        raise LakelensError(f"cannot read manifest {uri!r}: {e}") from e
    if not ({"uri", "path"} & set(names) or {"bucket", "key"} <= set(names)):
        raise LakelensError(f"manifest {uri!r} has no 'uri' or 'path' column (nor S3 Inventory's "
                            f"'bucket' and 'key'; it has: {', '.join(names)})")
    return uri


def _spread(root: str) -> list[tuple[str, bool]]:
    """Split a tree into listing tasks: the top SPREAD_DEPTH levels' own files (not
    recursive) and every directory below them (recursive). Only directory names are
    held here, never the files."""
    out: list[tuple[str, bool]] = []
    level = [root]
    for _ in range(SPREAD_DEPTH):
        below: list[str] = []
        for d in level:
            out.append((d, False))
            below.extend(_subdirs(d))
        level = below
    out.extend((d, True) for d in level)
    return out


def _subdirs(d: str) -> list[str]:
    if is_remote(d):
        fs, path = split_uri(d)
        prefix = d.split("://", 1)[0] + "://"
        return sorted(prefix + i.path.removeprefix(prefix) for i in fs.get_file_info(
            pafs.FileSelector(path, recursive=False)) if i.type == pafs.FileType.Directory)
    try:
        with os.scandir(d) as it:
            return sorted(e.path for e in it if e.is_dir(follow_symlinks=False))
    except OSError as e:
        raise LakelensError(f"cannot list {d!r}: {e.strerror or e}") from e


# -- listing one piece (runs in Ray tasks) ----------------------------------------------

def list_dir(root: str, recursive: bool) -> Iterator[pa.Table]:
    """Files under `root` (only its own files unless recursive), LIST_BATCH per table."""
    rows = _walk_remote(root, recursive) if is_remote(root) else _walk_local(root, recursive)
    batch: list[tuple] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= LIST_BATCH:
            yield _listing_table(batch)
            batch = []
    if batch:
        yield _listing_table(batch)


def _walk_local(root: str, recursive: bool) -> Iterator[tuple]:
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            logger.warning("cannot list %s: %s", d, e.strerror or e)
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append(e.path)
                    continue
                st = e.stat(follow_symlinks=True)
                yield e.path, st.st_size, st.st_mtime_ns, None, is_image_name(e.name)
            except FileNotFoundError:  # a broken symlink: listed, fails at read
                yield e.path, None, None, None, is_image_name(e.name)
            except OSError:
                yield e.path, None, None, None, is_image_name(e.name)


def _walk_remote(root: str, recursive: bool) -> Iterator[tuple]:
    fs, path = split_uri(root)
    prefix = root.split("://", 1)[0] + "://"
    for i in fs.get_file_info(pafs.FileSelector(path, recursive=recursive)):
        if i.type == pafs.FileType.File:
            uri = prefix + i.path.removeprefix(prefix)
            yield uri, i.size, i.mtime_ns, None, is_image_name(uri)


def _listing_table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 5
    return pa.table([pa.array(c, t.type) for c, t in zip(cols, LISTING_SCHEMA, strict=True)],
                    schema=LISTING_SCHEMA)


def text_manifest_rows(lines: list[str], base: str) -> pa.Table:
    """Lines of a text manifest (blank lines and # comments skipped) as listing rows."""
    entries = [line.strip() for line in lines if line and line.strip()]
    return stat_uris(resolve((e for e in entries if not e.startswith("#")), base))


def resolve(entries, base: str = "") -> list[str]:
    """Manifest entries as canonical URIs, relative ones against the manifest's folder."""
    out = []
    for entry in entries:
        if is_remote(entry) or os.path.isabs(entry.removeprefix("file://")):
            out.append(canonical(entry))
        elif is_remote(base):
            out.append(f"{base}/{entry}")
        else:
            out.append(canonical(os.path.join(base, entry)))
    return out


def stat_uris(uris: list[str], sizes: list | None = None, mtimes: list | None = None,
              etags: list | None = None) -> pa.Table:
    """A listing table for manifest entries; entries the manifest gave no size for are
    stat'ed (locally os.stat; on object stores one batched get_file_info)."""
    n = len(uris)
    sizes = list(sizes) if sizes is not None else [None] * n
    mtimes = list(mtimes) if mtimes is not None else [None] * n
    etags = list(etags) if etags is not None else [None] * n
    remote: dict[str, list[int]] = {}
    for i, uri in enumerate(uris):
        if sizes[i] is not None or etags[i]:
            continue
        if is_remote(uri):
            remote.setdefault(uri.split("://", 1)[0] + "://" + uri.split("://", 1)[1].split("/", 1)[0],
                              []).append(i)
            continue
        try:
            st = os.stat(uri)
            sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
        except OSError:
            pass  # missing: a read error row, and a new fingerprint once it appears
    for _, idx in remote.items():
        fs, _ = split_uri(uris[idx[0]])
        paths = [split_uri(uris[i])[1] for i in idx]
        try:
            infos = fs.get_file_info(paths)
        except OSError:
            continue
        for i, info in zip(idx, infos, strict=True):
            if info.type == pafs.FileType.File:
                sizes[i], mtimes[i] = info.size, info.mtime_ns
    return pa.table([pa.array(uris, pa.string()), pa.array(sizes, pa.int64()),
                     pa.array(mtimes, pa.int64()), pa.array(etags, pa.string()),
                     pa.array([True] * n, pa.bool_())], schema=LISTING_SCHEMA)


def parquet_manifest_rows(batch: pa.Table, base: str) -> pa.Table:
    """A batch of a Parquet manifest (lakelens's or S3 Inventory's) as listing rows."""
    names = batch.column_names
    if "uri" in names or "path" in names:
        entries = batch.column("uri" if "uri" in names else "path").to_pylist()
    else:
        entries = [f"s3://{b}/{k}" if b and k else None for b, k in zip(
            batch.column("bucket").to_pylist(), batch.column("key").to_pylist(), strict=True)]
    keep = [i for i, e in enumerate(entries) if e and e.strip()]
    resolved = resolve((entries[i].strip() for i in keep), base)

    def col(*options: str) -> list | None:
        name = next((o for o in options if o in names), None)
        if name is None:
            return None
        values = batch.column(name)
        if pa.types.is_timestamp(values.type):
            values = values.cast(pa.timestamp("ns", tz=values.type.tz)).cast(pa.int64())
        values = values.to_pylist()
        return [values[i] for i in keep]

    rows = stat_uris(resolved, col("size"), col("mtime_ns", "last_modified_date", "last_modified"),
                     col("etag", "e_tag"))
    if "is_image" in names:  # a glob's matches (pipelines.lake.diff): non-images are skipped
        rows = rows.set_column(4, "is_image", pa.array(col("is_image"), pa.bool_()))
    return rows


def list_local_images(path: str) -> list[str]:
    """Image files of a small local directory (query images), sorted."""
    out = []
    for root, _, names in os.walk(path):
        out.extend(os.path.join(root, n) for n in names if is_image_name(n))
    return sorted(out)
