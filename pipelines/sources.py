"""SOURCE arguments to a sorted, de-duplicated list of image URIs; reading their bytes.

A source is a local directory (recursive), a glob, a single image, a manifest
(``.txt``/``.lst``: one URI per line, ``#`` comments; ``.parquet``: a ``uri`` or ``path``
column), or a pyarrow/fsspec URI (``s3://``, ``gs://``, ``file://``, ...) to any of those.
Directories and globs keep files with an image extension (case-insensitive) and count
the rest; manifests are taken as they are, so a listed non-image becomes an error row.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from models.errors import LakelensError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
TEXT_MANIFESTS = (".txt", ".lst")
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Listing:
    uris: list[str]  # canonical, sorted within each source, duplicates dropped
    skipped: int  # files that are not images (by extension), in directories and globs


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def image_id(uri: str) -> str:
    """Stable id of a source object: the first 32 hex digits of sha256(canonical URI)."""
    return hashlib.sha256(uri.encode("utf-8", "surrogateescape")).hexdigest()[:32]


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


def _split_uri(uri: str) -> tuple[pafs.FileSystem, str]:
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
    fs, path = _split_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def list_sources(sources: Sequence[str]) -> Listing:
    """List every source; raises LakelensError for a source that does not exist."""
    if not sources:
        raise LakelensError("no SOURCE given; pass a directory, glob, manifest or URI")
    seen: set[str] = set()
    uris: list[str] = []
    skipped = 0
    for source in sources:
        found, skip = _list_one(source)
        skipped += skip
        for uri in found:
            if uri not in seen:
                seen.add(uri)
                uris.append(uri)
    logger.info("listed %d images (%d non-image files skipped)", len(uris), skipped)
    return Listing(uris, skipped)


def _list_one(source: str) -> tuple[list[str], int]:
    if is_remote(source):
        return _list_remote(source)
    path = canonical(source)
    if GLOB_CHARS & set(source) and not os.path.lexists(path):
        matches = sorted(glob.glob(os.path.expanduser(source), recursive=True))
        if not matches:
            raise LakelensError(f"SOURCE {source!r}: no files match this glob")
        files = [canonical(m) for m in matches if os.path.isfile(m) or os.path.islink(m)]
        return _keep_images(files)
    if os.path.isdir(path):
        files = [os.path.join(root, n) for root, _, names in os.walk(path) for n in names]
        return _keep_images(sorted(files))
    if os.path.lexists(path):
        if path.lower().endswith(TEXT_MANIFESTS + (".parquet",)):
            return _read_manifest(path, base=os.path.dirname(path)), 0
        return [path], 0  # a single file, named on purpose: an image or an error row
    raise LakelensError(f"SOURCE {source!r} does not exist")


def _keep_images(files: Iterable[str]) -> tuple[list[str], int]:
    files = list(files)
    images = [f for f in files if is_image_name(f)]
    return images, len(files) - len(images)


def _list_remote(source: str) -> tuple[list[str], int]:
    fs, path = _split_uri(source)
    info = fs.get_file_info(path)
    prefix = source.split("://", 1)[0] + "://"
    if info.type == pafs.FileType.NotFound:
        raise LakelensError(f"SOURCE {source!r} does not exist")
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(prefix + i.path.removeprefix(prefix)
                       for i in infos if i.type == pafs.FileType.File)
        return _keep_images(files)
    if source.lower().endswith(TEXT_MANIFESTS + (".parquet",)):
        return _read_manifest(source, base=source.rsplit("/", 1)[0]), 0
    return [source], 0


def _read_manifest(uri: str, base: str) -> list[str]:
    try:
        if uri.lower().endswith(".parquet"):
            fs, path = _split_uri(uri) if is_remote(uri) else (None, uri)
            table = pq.read_table(path, filesystem=fs)
            column = next((c for c in ("uri", "path") if c in table.column_names), None)
            if column is None:
                raise LakelensError(
                    f"manifest {uri!r} has no 'uri' or 'path' column (it has: "
                    f"{', '.join(table.column_names)})")
            entries = [e for e in table.column(column).to_pylist() if e]
        else:
            text = read_bytes(uri).decode("utf-8")
            entries = [line.strip() for line in text.splitlines()]
            entries = [e for e in entries if e and not e.startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        raise LakelensError(f"cannot read manifest {uri!r}: {e}") from e
    out = []
    for entry in entries:
        if is_remote(entry) or os.path.isabs(entry.removeprefix("file://")):
            out.append(canonical(entry))
        elif is_remote(base):
            out.append(f"{base}/{entry}")
        else:
            out.append(canonical(os.path.join(base, entry)))
    return out
