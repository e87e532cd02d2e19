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

    def batches(self, batch_rows: int = 65_536) -> Iterator[Rows]:
        """Every image's latest embedding, once, in file order."""
        latest = self.latest
        seen: set[str] = set()
        for batch in _scan(self.files, COLUMNS, batch_rows):
            batch = batch.filter(pc.is_valid(batch.column("embedding")))
            if not batch.num_rows:
                continue
            ids = batch.column("image_id").to_pylist()
            stamps = batch.column("annotated_at").cast(pa.int64()).to_pylist()
            keep = [i for i, (iid, ts) in enumerate(zip(ids, stamps, strict=True))
                    if ts == latest[iid] and iid not in seen]
            seen.update(ids[i] for i in keep)
            if not keep:
                continue
            batch = batch.take(pa.array(keep))
            emb = batch.column("embedding")
            vectors = emb.values.to_numpy(zero_copy_only=False).reshape(-1, self.dim)
            yield Rows(batch.column("image_id"), batch.column("uri"), batch.column("content_hash"),
                       np.ascontiguousarray(vectors, dtype=np.float32))

    def vectors(self, batch_rows: int = 65_536) -> Iterator[np.ndarray]:
        for rows in self.batches(batch_rows):
            yield rows.vectors

    @functools.cached_property
    def latest(self) -> dict[str, int]:
        """image_id -> its newest annotated_at (µs), over rows that have an embedding."""
        latest: dict[str, int] = {}
        for batch in _scan(self.files, ["image_id", "annotated_at", "embedding"], 16_384):
            batch = batch.filter(pc.is_valid(batch.column("embedding")))
            for iid, ts in zip(batch.column("image_id").to_pylist(),
                               batch.column("annotated_at").cast(pa.int64()).to_pylist(),
                               strict=True):
                if ts >= latest.get(iid, ts):
                    latest[iid] = ts
        return latest

    def count_embeddings(self) -> int:
        """Distinct images with an embedding."""
        return len(self.latest)


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
    used = tuple(f for f in files if _has_embed(f))
    return EmbeddingSource(path, used, next(iter(dims)), embedder, rows)


def _has_embed(f: str) -> bool:
    kv = pq.read_schema(f).metadata or {}
    return any(m["task"] == "embed" for m in json.loads(kv.get(b"lakelens.models", b"[]")))
