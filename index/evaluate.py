"""Retrieval quality: Recall@K as metric learning reports it (CUB-200, Cars196, SOP)."""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

from models.errors import LakelensError


def recall_at_k(embeddings: np.ndarray, labels: Sequence[int] | np.ndarray,
                ks: Sequence[int] = (1, 2, 4, 8)) -> dict[int, float]:
    """For each embedding as a query against all the others (itself excluded): the fraction
    of queries with at least one of the K nearest (inner product) sharing its label.

    embeddings: float32[n, d], L2-normalised for cosine; labels: int[n].
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise LakelensError(f"recall@K needs embeddings [n, d] and n labels; got {x.shape} and {len(y)}")
    if not ks or min(ks) < 1 or max(ks) >= len(x):
        raise LakelensError(f"K must be in 1..{len(x) - 1}, got {list(ks)}")
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, found = index.search(x, max(ks) + 1)
    return recall_of_neighbors(y, [row[row != i] for i, row in enumerate(found)], ks)


def recall_of_neighbors(labels: Sequence[int] | np.ndarray, neighbors: Sequence[Sequence[int]],
                        ks: Sequence[int]) -> dict[int, float]:
    """Recall@K from ranked neighbour positions per query (the query itself already
    dropped): the fraction of queries with a same-label item among the first K."""
    y = np.asarray(labels)
    hits = np.zeros((len(y), max(ks)), dtype=bool)
    for i, row in enumerate(neighbors):
        others = np.asarray(row, dtype=np.int64)[: max(ks)]
        hits[i, : len(others)] = y[others] == y[i]
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}
