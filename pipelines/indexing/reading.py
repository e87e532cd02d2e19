"""Reading the table's embeddings for an index build, part by part (in a Ray task or in
the driver), and what both ways of building share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index import build as B
from index import versions as V
from index.source import COLUMNS, vectors_of
from pipelines.lake.table import LakeTable, embed_weights

EMBEDDED = pc.field("embedding").is_valid()


def count_parts(table: LakeTable, parts: list[str], weights_id: str) -> list[tuple[str, int, int]]:
    """(part, rows with an embedding, of them made by another embedder) per part."""
    out = []
    for part in parts:
        count = others = 0
        for b in table.current_part(part, ["models"], where=EMBEDDED, batch_rows=65_536):
            count += b.num_rows
            made_by = embed_weights(b.column("models"))  # null: a row naming no embedder, taken as is
            others += int(pc.sum(pc.not_equal(made_by, weights_id)).as_py() or 0)
        out.append((part, count, others))
    return out


def scan_parts(table: LakeTable, parts: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The parts' rows with an embedding (COLUMNS), in the current view's order."""
    for part in parts:
        for b in table.current_part(part, COLUMNS, where=EMBEDDED, batch_rows=batch_rows):
            emb = b.column("embedding")
            if emb.null_count:
                b = b.filter(pc.is_valid(emb))
            if b.num_rows:
                yield b


def vectors(batches: Iterator[pa.RecordBatch], dim: int) -> Iterator[np.ndarray]:
    for b in batches:
        yield vectors_of(b.column("embedding"), dim)


def id_rows(b: pa.RecordBatch) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([b.column(c).cast(pa.string()) for c in V.IDS_SCHEMA.names],
                                      schema=V.IDS_SCHEMA)


# -- the job -----------------------------------------------------------------------------

@dataclass
class Plan:
    """What both ways of building share: the table state, counts, the empty index."""

    table: LakeTable
    parts: list[str]
    counts: list[int]  # per part
    dim: int
    embedder: dict
    choice: B.Choice
    index: faiss.Index  # new, untrained

    @property
    def n(self) -> int:
        return sum(self.counts)


def trained_of(plan_index: faiss.Index, sample: np.ndarray, gpu: bool) -> faiss.Index:
    """The index trained on `sample` (a CPU copy; on the GPU(s) when asked), still empty."""
    return B.train_and_add(plan_index, lambda: sample, [], gpu=gpu)
