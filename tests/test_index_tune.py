"""tune() on a real FAISS index (the `auto` kind at a test's size): the parameters it
returns reach the recall target, hold it on other queries, and cost no more than the
half-octave choice it starts from."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

import index.build as B
from index.filtered import numpy_search
from tests.helpers import clustered_vectors

DIM = 32
N = 60_000
AUTO = "IVF256_HNSW32,PQ16x4fsr,Refine(SQfp16)"  # what `auto` builds, at a test's size
TARGET = B.TARGET_RECALL + B.TUNE_MARGIN


@pytest.fixture(scope="module")
def built() -> tuple[faiss.Index, np.ndarray, np.ndarray]:
    # Wide clusters: the target needs tens of lists probed, so that there is room to tune.
    x = clustered_vectors(N + 2000, DIM, clusters=N // 100, spread=1.0, seed=5)
    data, queries = x[:N], x[N:]
    index = B.train_and_add(B.new_index(AUTO, DIM, "ip"), lambda: data, [data], gpu=False)
    truth = faiss.knn(queries, data, B.RECALL_K, metric=faiss.METRIC_INNER_PRODUCT)[1]
    return index, queries, truth


def half_octave_choice(index: faiss.Index, queries: np.ndarray, truth: np.ndarray) -> B.Trial:
    """The rule tune() used before its descent: the first half-octave nprobe (efSearch
    max(32, 2 * nprobe)) reaching the target with the widest shortlist, then the smallest
    k_factor that still does."""
    for nprobe in sorted({round(2 ** (i / 2)) for i in range(17)}):
        trial = {"nprobe": nprobe, "quantizer_efSearch": max(32, 2 * nprobe)}
        reached = None
        for kf in reversed(B.K_FACTORS):
            t = B.measure(index, queries, truth, {**trial, "k_factor": float(kf)})
            if t.recall < TARGET:
                break
            reached = t
        if reached is not None:
            return reached
    raise AssertionError("the half-octave scan never reached the target")


def test_tune_reaches_the_target_cheaper_than_the_half_octave_choice(built) -> None:
    index, queries, truth = built
    tune_q, tune_t, other_q, other_t = queries[:1000], truth[:1000], queries[1000:], truth[1000:]
    old = half_octave_choice(index, tune_q, tune_t)
    params, recall = B.tune(index, tune_q, tune_t)
    assert set(params) == {"nprobe", "quantizer_efSearch", "k_factor"}
    assert recall >= TARGET
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nprobe == params["nprobe"]  # left applied
    assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch == params["quantizer_efSearch"]
    new = B.measure(index, tune_q, tune_t, params)
    assert new.recall == recall
    # Cheaper by the work FAISS did for the same queries: fewer lists, a smaller graph search
    # or a shorter re-rank -- and strictly so here, where the half octaves overshoot.
    assert new.cost_ns < old.cost_ns, (params, old.params)
    assert params["nprobe"] <= old.params["nprobe"] * 1.5
    # Queries tune() never saw keep the recall within the margin.
    assert B.measure(index, other_q, other_t, params).recall >= B.TARGET_RECALL
    # The same index and queries always get the same parameters (no wall-clock timing).
    assert B.tune(index, tune_q, tune_t) == (params, recall)


def test_tune_keeps_the_shortlist_of_a_top_k_search_when_queries_are_rows(built) -> None:
    """Queries drawn from the indexed rows search k + 1 and drop their own row: the re-rank
    shortlist then holds k * k_factor other rows (and the row itself), as an unseen
    query's does, not (k + 1) * k_factor, which would measure a better recall."""
    index, _, _ = built
    k = B.RECALL_K
    refine = faiss.downcast_index(index)
    stored = faiss.downcast_index(refine.refine_index).reconstruct_n(0, N)  # the fp16 rows
    rows = np.arange(0, N, N // 500)[:500]
    queries = np.ascontiguousarray(stored[rows])
    flat = faiss.IndexFlatIP(stored.shape[1])  # not faiss.knn: faiss.contrib.torch_utils (imported
    flat.add(stored)                           # by other tests, as by pytorch-metric-learning) swaps it
    truth = B.drop_rows(numpy_search(flat)(queries, k + 1)[1], rows, k)
    params = {"nprobe": 8, "quantizer_efSearch": 32, "k_factor": 4.0}
    seen = B.measure(index, queries, truth, params, exclude=rows)
    assert refine.k_factor == 4.0  # the stored value is left applied, not the widened one

    def recall_with_shortlist(candidates: int) -> float:
        refine.k_factor = (candidates + 0.5) / (k + 1)
        found = B.drop_rows(index.search(queries, k + 1)[1], rows, k)
        refine.k_factor = 4.0
        return B.recall_at_k(found, truth)

    assert seen.recall == recall_with_shortlist(k * 4 + 1)
    assert seen.recall <= recall_with_shortlist((k + 1) * 4)
