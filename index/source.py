"""Embeddings streamed from a lakelens results table, in record batches.

Memory is bounded by the batch size (and by one small entry per image for
de-duplication), never by holding the vectors of the whole lake.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.errors import LakelensError

logger = logging.getLogger(__name__)

READS_SCHEMA_VERSION = "1"  # the results schema version this reader understands
COLUMNS = ["image_id", "uri", "content_hash", "embedding", "annotated_at"]
BATCH_ROWS = 16_384



@dataclass(frozen=True)
class Rows:
    """One batch: row metadata and float32[n, dim] vectors (null embeddings dropped)."""

    image_ids: pa.Array  # string
    uris: pa.Array  # string
    content_hashes: pa.Array  # string
    vectors: np.ndarray


@dataclass(frozen=True)
class EmbeddingSource:
    """The results files of one or more runs that share an embedder and a dim."""

    path: str
    files: tuple[str, ...]
    dim: int
    embedder: dict  # {"arch", "weights" (id), "spec" (what annotate was given)}
    rows: int  # rows in the files (with or without an embedding)

    def batches(self, batch_rows: int = BATCH_ROWS) -> Iterator[Rows]:
        """Every image's newest embedding, once, in file order."""
        dups = self._duplicates
        seen: set[str] = set()
        for batch in _scan(self.files, COLUMNS, batch_rows):
            if batch.column("embedding").null_count:
                batch = batch.filter(pc.is_valid(batch.column("embedding")))
            if dups.newest and batch.num_rows:
                batch = self._drop_superseded(batch, dups, seen)
            if not batch.num_rows:
                continue
            emb = batch.column("embedding")
            flat = emb.values.slice(emb.offset * self.dim, len(emb) * self.dim)
            vectors = flat.to_numpy(zero_copy_only=False).reshape(-1, self.dim)
            yield Rows(batch.column("image_id"), batch.column("uri"), batch.column("content_hash"),
                       np.ascontiguousarray(vectors, dtype=np.float32))

    def _drop_superseded(self, batch: pa.RecordBatch, dups: _Duplicates,
                         seen: set[str]) -> pa.RecordBatch:
        ids = batch.column("image_id").to_pylist()
        suspect = np.isin(_keys(ids), dups.keys)
        if not suspect.any():
            return batch
        stamps = batch.column("annotated_at").cast(pa.int64()).to_numpy(zero_copy_only=False)
        keep = np.ones(len(ids), bool)
        for i in np.flatnonzero(suspect):
            newest = dups.newest.get(ids[i])
            if newest is not None and (stamps[i] != newest or ids[i] in seen):
                keep[i] = False
            elif newest is not None:
                seen.add(ids[i])
        return batch if keep.all() else batch.filter(pa.array(keep))

    def vectors(self, batch_rows: int = BATCH_ROWS) -> Iterator[np.ndarray]:
        for rows in self.batches(batch_rows):
            yield rows.vectors

    def count_embeddings(self) -> int:
        """Distinct images with an embedding."""
        return self._duplicates.distinct

    @functools.cached_property
    def _duplicates(self) -> _Duplicates:
        """One pass over the ids: how many distinct images, and for the image_ids that occur
        more than once (a lake annotated by several runs) which row is newest. Memory: 8
        bytes per row plus an entry per repeated image."""
        keys = [_keys(b.column("image_id").to_pylist())
                for b in self._id_batches(["image_id"])]
        all_keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        uniq, counts = np.unique(all_keys, return_counts=True)
        del all_keys, keys
        dup_keys = uniq[counts > 1]
        newest: dict[str, int] = {}
        if len(dup_keys):
            for b in self._id_batches(["image_id", "annotated_at"]):
                ids = b.column("image_id").to_pylist()
                stamps = b.column("annotated_at").cast(pa.int64()).to_pylist()
                for i in np.flatnonzero(np.isin(_keys(ids), dup_keys)):
                    newest[ids[i]] = max(stamps[i], newest.get(ids[i], stamps[i]))
        # Hash-equal keys that hold different ids were counted once; count them apart.
        distinct = len(uniq) - len(dup_keys) + len(newest)
        return _Duplicates(dup_keys, newest, distinct)

    def _id_batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        for batch in _scan(self.files, columns + ["embedding"], BATCH_ROWS):
            valid = pc.is_valid(batch.column("embedding"))
            yield batch.select(columns).filter(valid) if batch.column("embedding").null_count \
                else batch.select(columns)


@dataclass(frozen=True)
class _Duplicates:
    keys: np.ndarray  # int64 keys of image_ids seen more than once
    newest: dict[str, int]  # those image_ids -> their newest annotated_at (µs)
    distinct: int


def _keys(ids: list[str]) -> np.ndarray:
    """64-bit keys of image_ids (equal ids, equal keys; a collision only costs a check)."""
    return np.fromiter((hash(i) for i in ids), dtype=np.int64, count=len(ids))


def _scan(files: tuple[str, ...], columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches, one file and one batch at a time (pyarrow's dataset scanner reads 16
    batches ahead: with 256-d vectors that alone is a gigabyte)."""
    for f in files:
        reader = pq.ParquetFile(f, pre_buffer=False)
        yield from reader.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)


def results_files(path: str) -> list[str]:
    """The Parquet files of a results table: DIR (an annotate --out), DIR/results, or files."""
    if os.path.isfile(path):
        return [path]
    for candidate in (os.path.join(path, "results"), path):
        files = sorted(glob.glob(os.path.join(candidate, "*.parquet")))
        if files:
            return files
    if not os.path.exists(path):
        raise LakelensError(f"results {path!r} do not exist")
    raise LakelensError(f"no results Parquet files in {path!r} (nor in {path}/results)")


def open_source(path: str) -> EmbeddingSource:
    """Inspect the files' schemas: one schema version, one dim, one embedder, or an error."""
    files = results_files(path)
    dims: dict[int, str] = {}
    embedders: dict[tuple[str, str], dict] = {}
    rows = 0
    used: list[str] = []
    for f in files:
        try:
            meta = pq.read_metadata(f)
        except Exception as e:
            raise LakelensError(f"{f} is not a readable Parquet file: {e}") from e
        schema = meta.schema.to_arrow_schema()
        kv = schema.metadata or {}
        version = kv.get(b"lakelens.schema_version", b"").decode()
        if version != READS_SCHEMA_VERSION:
            raise LakelensError(f"{f} is not a lakelens results file of schema version "
                                f"{READS_SCHEMA_VERSION} (found {version or 'none'})")
        emb_type = schema.field("embedding").type
        models = json.loads(kv.get(b"lakelens.models", b"[]"))
        embed = next((m for m in models if m["task"] == "embed"), None)
        if embed is None:
            continue  # a run without the embed task: nothing to index in this file
        dims.setdefault(emb_type.list_size, f)
        embedders.setdefault((embed["arch"], embed["weights"]), {**embed, "file": f})
        rows += meta.num_rows
        used.append(f)
    if not dims:
        raise LakelensError(f"no embeddings in {path!r}: run `lakelens annotate --tasks embed` first")
    if len(dims) > 1:
        detail = "; ".join(f"dim {d} in {f}" for d, f in dims.items())
        raise LakelensError(f"refusing to mix embeddings of different dims: {detail}")
    if len(embedders) > 1:
        detail = "; ".join(f"{a} ({w}) in {e['file']}" for (a, w), e in embedders.items())
        raise LakelensError(f"refusing to mix embeddings of different embedders: {detail}")
    embedder = next(iter(embedders.values()))
    embedder = {k: embedder[k] for k in ("arch", "weights", "spec") if k in embedder}
    return EmbeddingSource(path, tuple(used), next(iter(dims)), embedder, rows)
