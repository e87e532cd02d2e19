"""Embeddings streamed in record batches from wherever the caller keeps them.

The caller (pipelines.indexing, over the lake table's current view) gives a function that
streams record batches of (image_id, uri, content_hash, embedding); memory is bounded by
the batch size, never by the size of the lake. No Ray, no table format here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

COLUMNS = ["image_id", "uri", "content_hash", "embedding"]
BATCH_ROWS = 16_384


@dataclass(frozen=True)
class Rows:
    """One batch: row metadata and float32[n, dim] vectors (null embeddings dropped)."""

    image_ids: pa.Array  # string
    uris: pa.Array  # string
    content_hashes: pa.Array  # string
    vectors: np.ndarray


def vectors_of(column: pa.Array, dim: int) -> np.ndarray:
    """float32[n, dim] from a list<float32> or fixed_size_list<float32> column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = pc.list_flatten(column) if not pa.types.is_fixed_size_list(column.type) else \
        column.values.slice(column.offset * dim, len(column) * dim)
    values = flat.to_numpy(zero_copy_only=False)
    if values.size != len(column) * dim:
        raise ValueError(f"embeddings are not all of dim {dim}")
    return np.ascontiguousarray(values.reshape(-1, dim), dtype=np.float32)


@dataclass(frozen=True)
class EmbeddingSource:
    """Images with an embedding, one row each, from one embedder of one dim."""

    name: str  # where they come from, for messages
    dim: int
    embedder: dict  # {"arch", "weights" (id), "spec" (what annotate was given)}
    count: int  # rows with an embedding
    scan: Callable[[int], Iterator[pa.RecordBatch]]  # batch_rows -> batches of COLUMNS

    def batches(self, batch_rows: int = BATCH_ROWS) -> Iterator[Rows]:
        for batch in self.scan(batch_rows):
            emb = batch.column("embedding")
            if emb.null_count:
                batch = batch.filter(pc.is_valid(emb))
                emb = batch.column("embedding")
            if not batch.num_rows:
                continue
            yield Rows(batch.column("image_id"), batch.column("uri"), batch.column("content_hash"),
                       vectors_of(emb, self.dim))

    def vectors(self, batch_rows: int = BATCH_ROWS) -> Iterator[np.ndarray]:
        for rows in self.batches(batch_rows):
            yield rows.vectors

    def count_embeddings(self) -> int:
        return self.count
