"""SOURCE arguments: what to list, how to list a piece of it, and reading bytes. No Ray.

A source is a local directory (recursive), a glob, a single image, a manifest (``.txt``/
``.lst``: one URI per line, ``#`` comments; ``.parquet``: a ``uri`` or ``path`` column, or
S3 Inventory's ``bucket`` + ``key``, with optional ``size``, ``last_modified_date`` /
``mtime_ns`` and ``e_tag`` / ``etag``), or a pyarrow/fsspec URI (``s3://``, ``gs://``,
``file://``, ...) to any of those. Directories and globs keep files with an image
extension (case-insensitive) and count the rest by extension; manifests are taken as
they are, so a listed non-image becomes an error row.

The driver only plans (`plan_sources`: which directories to list, which manifests to
read); the listing itself runs in Ray tasks (pipelines.lake.diff), one batch of at most
LIST_BATCH entries at a time, so no process holds every URI of the lake. A directory level
with more than SPLIT_FILES entries is listed by several tasks, each a range of names
(`ListItem.start`/`end`). A directory that cannot be listed becomes one marker row with
`list_error` set (its images must not look vanished).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from models.decode import IMAGE_EXTENSIONS, read_capped, read_file
from models.errors import LakelensError

logger = logging.getLogger(__name__)

TEXT_MANIFESTS = (".txt", ".lst")
GLOB_CHARS = set("*?[")
LIST_BATCH = 10_000
SPREAD_DEPTH = 2  # directory levels the driver expands so that listing tasks share the tree
SPLIT_FILES = 100_000  # a directory level with more entries is listed by several tasks (name ranges)
SAMPLE_NAMES = 1_000  # file names the driver keeps (reservoir) to choose a local level's split points
MAX_RANGES = 256  # at most this many range tasks for one local directory level
REMOTE_RANGES = 128  # about this many ranges for a large object-store prefix
S3_PAGE = 1000  # keys per ListObjectsV2 call (S3's most)
LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                            ("etag", pa.string()), ("is_image", pa.bool_()),
                            ("list_error", pa.string())])  # set on a marker row: uri = the unlistable dir


@dataclass(frozen=True)
class ListItem:
    """One listing task: the files of `root` (everything below it if recursive) whose name
    relative to `root` ("a.jpg", "sub/b.jpg") is in [start, end); None is unbounded."""

    root: str
    recursive: bool
    start: str | None = None
    end: str | None = None


@dataclass(frozen=True)
class SourcePlan:
    """What the listing tasks do: each entry is small; the URIs themselves are not here."""

    dirs: list[ListItem] = field(default_factory=list)
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


def _filesystem(prefix: str) -> pafs.FileSystem:
    """A filesystem for `scheme://netloc`, pyarrow's own or fsspec's; cached per endpoint
    settings (a process that points AWS_ENDPOINT_URL elsewhere gets a new one)."""
    env = tuple(os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID"))
    return _cached_filesystem(prefix, env)


@functools.lru_cache(maxsize=16)
def _cached_filesystem(prefix: str, env: tuple) -> pafs.FileSystem:
    del env  # part of the cache key only
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


def read_bytes(uri: str, *, max_bytes: int | None = None) -> bytes:
    """The object's bytes. Raises OSError (FileNotFoundError, PermissionError, ...), and
    FileTooLargeError for an object over `max_bytes` (None: no cap): its size (fstat, or
    the size the store reports on open, no extra request) is checked before any byte is
    read, and at most max_bytes + 1 bytes are read whatever it said."""
    if not is_remote(uri):
        return read_file(uri, max_bytes)
    fs, path = split_uri(uri)
    if max_bytes is None:
        with fs.open_input_stream(path) as f:
            return f.read()
    with fs.open_input_file(path) as f:
        return read_capped(f, max_bytes, size=f.size())


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


def _spread(root: str) -> list[ListItem]:
    """Split a tree into listing tasks: the top SPREAD_DEPTH levels' own files (not
    recursive; a level with more than SPLIT_FILES entries in name ranges) and every
    directory below them (recursive). Only directory names are held here, never the
    files. A directory below `root` that cannot be listed is left to a task, which reports
    it as a marker row."""
    out: list[ListItem] = []
    level = [root]
    for _ in range(SPREAD_DEPTH):
        below: list[str] = []
        for d in level:
            try:
                items, subdirs = _plan_level(d)
            except Exception as e:  # OSError, or a store client's own error
                if d == root:
                    raise LakelensError(f"cannot list {d!r}: {_one_line(e)}") from e
                logger.warning("cannot list %s: %s", d, _one_line(e))
                out.append(ListItem(d, True))
                continue
            out.extend(items)
            below.extend(subdirs)
        level = below
    out.extend(ListItem(d, True) for d in level)
    return out


def _plan_level(d: str) -> tuple[list[ListItem], list[str]]:
    """The items listing `d`'s own files, and its subdirectories to plan further."""
    if d.startswith("s3://") and _s3_client() is not None:
        return _plan_s3_level(d)
    if is_remote(d):
        fs, path = split_uri(d)
        prefix = d.split("://", 1)[0] + "://"
        subdirs = sorted(prefix + i.path.removeprefix(prefix) for i in fs.get_file_info(
            pafs.FileSelector(path, recursive=False)) if i.type == pafs.FileType.Directory)
        return [ListItem(d, False)], subdirs
    return _plan_local_level(d)


def _plan_local_level(d: str) -> tuple[list[ListItem], list[str]]:
    """One streaming pass over `d`: its subdirectories, how many files, and a bounded
    sample of their names; more than SPLIT_FILES files are split at the sample's quantiles."""
    subdirs: list[str] = []
    sample: list[str] = []
    files = 0
    rand = random.Random(0)  # the same plan for the same directory
    with os.scandir(d) as it:
        for e in it:
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(e.path)
                continue
            files += 1
            if len(sample) < SAMPLE_NAMES:
                sample.append(e.name)
            else:
                j = rand.randrange(files)
                if j < SAMPLE_NAMES:
                    sample[j] = e.name
    if files <= SPLIT_FILES:
        return [ListItem(d, False)], sorted(subdirs)
    parts = min(-(-files // SPLIT_FILES), MAX_RANGES, len(sample))
    sample.sort()
    points = sorted({sample[len(sample) * i // parts] for i in range(1, parts)})
    logger.info("%s: %d files, listed in %d name ranges", d, files, len(points) + 1)
    return _ranges(d, False, points), sorted(subdirs)


def _ranges(root: str, recursive: bool, points: list[str]) -> list[ListItem]:
    """Items covering every name exactly once: [None, p0), [p0, p1), ..., [pN, None)."""
    bounds: list[str | None] = [None, *sorted(set(points)), None]
    return [ListItem(root, recursive, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def _in_range(name: str, start: str | None, end: str | None) -> bool:
    return (start is None or name >= start) and (end is None or name < end)


def _may_hold(dir_name: str, start: str | None, end: str | None) -> bool:
    """Whether names below the relative directory `dir_name` can be in [start, end): they
    all lie in [dir_name + "/", dir_name + "0") ("0" follows "/")."""
    return (end is None or dir_name + "/" < end) and (start is None or start < dir_name + "0")


def _one_line(e: BaseException) -> str:
    """"PermissionError: [Errno 13] Permission denied": the error without its path, one line."""
    if isinstance(e, OSError) and e.strerror:
        text = f"[Errno {e.errno}] {e.strerror}" if e.errno is not None else e.strerror
    else:
        text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:500]


# -- S3 through boto3 when installed: paginated, with StartAfter ---------------------------

def _s3_client():
    """A boto3 S3 client (None without boto3: pyarrow lists S3, unsplit and unpaginated)."""
    return _s3_client_for(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
                          os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))


@functools.lru_cache(maxsize=4)
def _s3_client_for(endpoint: str | None, region: str | None):
    try:
        import boto3
    except ImportError:
        return None
    return boto3.client("s3")  # endpoint, region and credentials as boto3 reads them


def _s3_location(uri: str) -> tuple[str, str]:
    """(bucket, key prefix of the directory: "" or ending in "/")."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    key = key.strip("/")
    return bucket, key + "/" if key else ""


def _plan_s3_level(d: str) -> tuple[list[ListItem], list[str]]:
    """List `d` with a delimiter until it proves large (more than SPLIT_FILES entries):
    then the whole prefix is split by leading characters into recursive ranges."""
    client = _s3_client()
    bucket, prefix = _s3_location(d)
    subdirs: list[str] = []
    entries = 0
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, Delimiter="/", PaginationConfig={"PageSize": S3_PAGE})
    for page in pages:
        subdirs.extend(f"s3://{bucket}/{p['Prefix'].rstrip('/')}" for p in page.get("CommonPrefixes", []))
        entries += len(page.get("Contents", [])) + len(page.get("CommonPrefixes", []))
        if entries > SPLIT_FILES:
            points = _key_split_points(client, bucket, prefix, REMOTE_RANGES)
            logger.info("%s: more than %d entries, listed in %d key ranges", d, SPLIT_FILES,
                        len(points) + 1)
            return _ranges(d, True, points), []
    return [ListItem(d, False)], sorted(subdirs)


def _key_split_points(client, bucket: str, prefix: str, want: int) -> list[str]:
    """Split points (names relative to `prefix`) from the leading characters present,
    probed breadth first until about `want`: one LIST of one key per character found, and
    one LIST per character whether it leads more keys than a range should hold (those
    are split by their next character, the others are not split further)."""
    small = min(S3_PAGE, max(1, SPLIT_FILES // 2))
    points: set[str] = set()
    frontier = deque([""])  # the prefix is known to be large
    calls = 0
    while frontier and len(points) + 1 < want and calls < 8 * want:  # long shared prefixes cost calls
        q = frontier.popleft()
        chars = _next_chars(client, bucket, prefix + q)
        calls += 2 * len(chars) + 1
        points.update(q + c for c in chars[1:])  # [q, q + chars[0]) holds at most the key q
        frontier.extend(q + c for c in chars if client.list_objects_v2(
            Bucket=bucket, Prefix=prefix + q + c, MaxKeys=small).get("IsTruncated"))
    return sorted(points)[: max(want - 1, 0)]


def _next_chars(client, bucket: str, key_prefix: str, limit: int = 256) -> list[str]:
    """The characters that follow `key_prefix` in its keys, ascending."""
    chars: list[str] = []
    after = None
    while len(chars) < limit:
        kwargs = {"Bucket": bucket, "Prefix": key_prefix, "MaxKeys": 1}
        if after is not None:
            kwargs["StartAfter"] = after
        found = client.list_objects_v2(**kwargs).get("Contents", [])
        if not found:
            break
        key = found[0]["Key"]
        if key == key_prefix:
            after = key
            continue
        c = key[len(key_prefix)]
        chars.append(c)
        nxt = ord(c) + 1
        after = key_prefix + chr(0xE000 if 0xD800 <= nxt < 0xE000 else nxt)  # past every key_prefix + c...
    return chars


def _walk_s3(root: str, recursive: bool, start: str | None, end: str | None) -> Iterator[tuple]:
    """One page (at most 1000 keys) at a time, from `start` on, stopping at `end`."""
    client = _s3_client()
    bucket, prefix = _s3_location(root)
    kwargs = {"Bucket": bucket, "Prefix": prefix}
    if not recursive:
        kwargs["Delimiter"] = "/"
    if start is not None:  # StartAfter is exclusive: the key `start` itself is looked up first
        first = client.list_objects_v2(Bucket=bucket, Prefix=prefix + start, MaxKeys=1).get("Contents", [])
        if first and first[0]["Key"] == prefix + start and not start.endswith("/"):
            yield _s3_row(bucket, first[0])
        kwargs["StartAfter"] = prefix + start
    pages = client.get_paginator("list_objects_v2").paginate(**kwargs, PaginationConfig={"PageSize": S3_PAGE})
    for page in pages:
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if end is not None and key[len(prefix):] >= end:
                return
            if not key.endswith("/"):  # a "folder" marker object, not a file
                yield _s3_row(bucket, obj)


def _s3_row(bucket: str, obj: dict) -> tuple:
    uri = f"s3://{bucket}/{obj['Key']}"
    modified = obj["LastModified"]
    mtime_ns = int(modified.timestamp()) * 10**9 + modified.microsecond * 1000
    # No etag: the fingerprint stays size:mtime, as pyarrow's listing gave it, so that
    # already annotated images do not all look changed.
    return uri, obj["Size"], mtime_ns, None, is_image_name(uri), None


# -- listing one piece (runs in Ray tasks) ----------------------------------------------

def list_dir(root: str, recursive: bool, start: str | None = None,
             end: str | None = None) -> Iterator[pa.Table]:
    """Files under `root` (only its own files unless recursive) whose name relative to it
    is in [start, end), LIST_BATCH per table. What cannot be listed becomes a marker row."""
    if root.startswith("s3://") and _s3_client() is not None:
        rows = _walk_s3(root, recursive, start, end)
    elif is_remote(root):
        rows = _walk_remote(root, recursive, start, end)
    else:
        rows = _walk_local(root, recursive, start, end)
    batch: list[tuple] = []
    try:
        for row in rows:
            batch.append(row)
            if len(batch) >= LIST_BATCH:
                yield _listing_table(batch)
                batch = []
    except Exception as e:  # a store's LIST failing (botocore's errors are no OSError)
        logger.warning("cannot list %s: %s", root, _one_line(e))
        batch.append(_marker(root, e))
    if batch:
        yield _listing_table(batch)


def _marker(directory: str, e: BaseException) -> tuple:
    """The row of a directory (or range, or prefix) that could not be listed."""
    return directory, None, None, None, False, _one_line(e)


def _walk_local(root: str, recursive: bool, start: str | None, end: str | None) -> Iterator[tuple]:
    stack = [(root, "")]  # (directory, its path relative to root with a trailing "/")
    while stack:
        d, rel = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    name = rel + e.name
                    try:
                        is_dir = e.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False
                    if is_dir:
                        if recursive and _may_hold(name, start, end):
                            stack.append((e.path, name + "/"))
                        continue
                    if _in_range(name, start, end):
                        yield _local_row(e)
        except OSError as e:
            logger.warning("cannot list %s: %s", d, _one_line(e))
            yield _marker(d, e)


def _local_row(e: os.DirEntry) -> tuple:
    try:
        st = e.stat(follow_symlinks=True)
        return e.path, st.st_size, st.st_mtime_ns, None, is_image_name(e.name), None
    except OSError:  # e.g. a broken symlink: listed, fails at read
        return e.path, None, None, None, is_image_name(e.name), None


def _walk_remote(root: str, recursive: bool, start: str | None, end: str | None) -> Iterator[tuple]:
    """Stores other than S3 (or S3 without boto3): pyarrow's listing, held whole."""
    fs, path = split_uri(root)
    prefix = root.split("://", 1)[0] + "://"
    base = path.rstrip("/") + "/"
    for i in fs.get_file_info(pafs.FileSelector(path, recursive=recursive)):
        if i.type == pafs.FileType.File and _in_range(i.path.removeprefix(base), start, end):
            uri = prefix + i.path.removeprefix(prefix)
            yield uri, i.size, i.mtime_ns, None, is_image_name(uri), None


def _listing_table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [[]] * len(LISTING_SCHEMA)
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
                     pa.array([True] * n, pa.bool_()), pa.nulls(n, pa.string())], schema=LISTING_SCHEMA)


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
