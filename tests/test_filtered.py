"""Filtered search keeps its recall: real FAISS indexes (the `auto` kind forced at small
scale, Flat, IVF-Flat, HNSW, IVF-PQ), compared with exact search over exactly the allowed
live rows. Filters are random over the rows of many small clusters, so the allowed
neighbours of a query lie in other clusters, far from its own inverted lists."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

import index.build as B
import index.filtered as F
from index import store
from index.filtered import FilteredSearch, numpy_search
from index.store import SimilarityIndex, open_index
from models.errors import LakelensError
from tests.helpers import clustered_vectors

DIM = 32
N = 60_000
AUTO = "IVF256_HNSW32,PQ16x4fsr,Refine(SQfp16)"  # what `auto` builds, at a test's size


def save_index(path: Path, x: np.ndarray, factory: str, *, metric: str = "ip",
               live: np.ndarray | None = None, queries: np.ndarray | None = None) -> SimilarityIndex:
    """Build `factory` over x (row i = x[i]), tune it on `queries` as `lakelens index build`
    does, save it as a lakelens index version and open it."""
    index = B.train_and_add(B.new_index(factory, x.shape[1], metric), lambda: x, [x], gpu=False)
    params: dict = {}
    if queries is not None and (B.ivf_of(index) is not None or "Refine" in factory):
        truth = faiss.knn(queries, x, 10, metric=B.METRICS[metric])[1]
        params, _ = B.tune(index, queries, truth)
    ids = pa.array([f"img{i:07d}" for i in range(len(x))])
    live = np.ones(len(x), bool) if live is None else live
    store.save(path, index, pa.table({"image_id": ids, "uri": ids, "content_hash": ids,
                                      "live": pa.array(live)}),
               {"factory": factory, "dim": x.shape[1], "metric": metric, "search_params": params})
    return open_index(path)


def exact_allowed(x: np.ndarray, q: np.ndarray, rows: np.ndarray, k: int, metric: str = "ip"):
    """Exact top-k rows (and scores) of q among x[rows]."""
    dist, found = faiss.knn(q, np.ascontiguousarray(x[rows]), min(k, len(rows)), metric=B.METRICS[metric])
    return dist, rows[found]


def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / truth.shape[1]
                          for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = clustered_vectors(N + 300, DIM, clusters=3000, spread=0.5, seed=11)
    return x[:N], x[N:]  # indexed rows, held-out queries of the same clusters


@pytest.fixture(scope="module")
def auto(data, tmp_path_factory) -> SimilarityIndex:
    x, q = data
    return save_index(tmp_path_factory.mktemp("auto") / "idx", x, AUTO, queries=q[:200])


@pytest.mark.parametrize("share", [0.01, 0.001])
def test_selective_filters_keep_recall_on_the_auto_index(data, auto: SimilarityIndex, share: float) -> None:
    x, q = data
    q = q[:200]
    rows = np.sort(np.random.default_rng(5).choice(N, int(N * share), replace=False))
    mask = np.zeros(N, bool)
    mask[rows] = True
    by_rows = auto.search(q, 10, allow=rows)
    by_mask = auto.search(q, 10, allow=mask)
    _, truth = exact_allowed(x, q, rows, 10)
    assert recall(by_rows.rows, truth) >= 0.95
    assert all(np.isin(r, rows).all() and len(r) == 10 for r in by_rows.rows)
    assert all((a == b).all() for a, b in zip(by_rows.rows, by_mask.rows, strict=True))
    assert all((a == b).all() for a, b in zip(by_rows.scores, by_mask.scores, strict=True))
    assert by_rows.image_ids[0] == [f"img{r:07d}" for r in by_rows.rows[0]]
    # What FAISS's selector alone gives at the tuned nprobe, for the record: the allowed
    # neighbours lie outside the probed lists, so this data does test the plan.
    params = store.search_parameters(auto.index, auto.manifest["search_params"], mask, always=True)
    selector = numpy_search(auto.index)(q, 10, params=params)[1]
    assert recall(list(selector), truth) < 0.9


@pytest.fixture(scope="module")
def coarse(tmp_path_factory) -> tuple[np.ndarray, np.ndarray, SimilarityIndex]:
    """Larger clusters: the tuned nprobe is small, and a 5-10% filter is answered from the
    lists nearest the query."""
    x = clustered_vectors(N + 200, DIM, clusters=300, spread=0.5, seed=12)
    x, q = x[:N], x[N:]
    return x, q, save_index(tmp_path_factory.mktemp("coarse") / "idx", x, AUTO, queries=q)


@pytest.mark.parametrize(("which", "share", "plan"), [
    ("coarse", 0.05, "lists"), ("coarse", 0.1, "lists"), ("coarse", 0.3, "selector"),
    ("auto", 0.2, "selector"), ("auto", 0.5, "selector")])
def test_larger_filters_keep_recall_in_every_plan(request: pytest.FixtureRequest, data, which: str,
                                                  share: float, plan: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Filters too large to score whole (the bound lowered to reach them at this size)
    probe lists in proportion to their selectivity; FAISS's selector re-ranks a longer
    shortlist."""
    monkeypatch.setattr(F, "EXACT_MAX_BYTES", 0)
    if which == "auto":
        (x, q), idx = data, request.getfixturevalue("auto")
    else:
        x, q, idx = request.getfixturevalue("coarse")
    q = q[:200]
    rows = np.sort(np.random.default_rng(6).choice(N, int(N * share), replace=False))
    assert FilteredSearch(idx.index).plan(len(rows), idx.manifest["search_params"]["nprobe"]).kind == plan
    found = idx.search(q, 10, allow=rows)
    assert all(np.isin(r, rows).all() and len(r) == 10 for r in found.rows)
    assert recall(found.rows, exact_allowed(x, q, rows, 10)[1]) >= 0.95


def test_dead_rows_stay_out_and_l2_scores_are_exact(data, tmp_path: Path) -> None:
    x, q = data
    x, q = x[:20_000], q[:100]
    rng = np.random.default_rng(7)
    live = rng.random(len(x)) > 0.2
    idx = save_index(tmp_path / "idx", x, "IVF64_HNSW32,PQ16x4fsr,Refine(SQfp16)", metric="l2",
                     live=live, queries=q)
    rows = np.sort(rng.choice(len(x), 200, replace=False))  # 1%, a fifth of it dead
    alive = rows[live[rows]]
    found = idx.search(q, 10, allow=rows)
    scores, truth = exact_allowed(x, q, alive, 10, "l2")
    assert all(np.isin(r, alive).all() and len(r) == 10 for r in found.rows)
    assert recall(found.rows, truth) >= 0.95
    first = np.stack(found.scores)[:, 0]
    assert (np.diff(np.stack(found.scores), axis=1) >= 0).all()  # squared distances, nearest first
    np.testing.assert_allclose(first, scores[:, 0], rtol=1e-2, atol=1e-3)  # fp16 codes


@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat", "HNSW16", "IVF64,SQ8", "SQ8",
                                     "IVF32_HNSW32,PQ16x4fsr,Refine(SQfp16)"])
def test_a_filter_keeping_fewer_than_k_rows_returns_exactly_those(tmp_path: Path, factory: str) -> None:
    x = clustered_vectors(8000, DIM, clusters=400, spread=0.5, seed=2)
    live = np.ones(len(x), bool)
    live[4321] = False
    save_index(tmp_path / "idx", x, factory, live=live)
    many = np.arange(0, len(x), 7)
    mask = np.zeros(len(x), bool)
    mask[many] = True
    answers = []
    for mmap in (False, True):
        idx = open_index(tmp_path / "idx", mmap=mmap)
        found = idx.search(x[:3], 10, allow=np.array([17, 999, 4321, 7000]))  # 4321 is dead
        for r, s in zip(found.rows, found.scores, strict=True):
            assert sorted(r.tolist()) == [17, 999, 7000] and (np.diff(s) <= 0).all()
        assert idx.search(x[:2], 5, allow=np.zeros(0, np.int64)).rows[0].size == 0
        assert idx.search(x[:2], 5, allow=np.array([4321])).rows[1].size == 0
        # every plan of every index type gives the mask's answers from the rows
        a, b = idx.search(x[:20], 10, allow=many), idx.search(x[:20], 10, allow=mask)
        assert [r.tolist() for r in a.rows] == [r.tolist() for r in b.rows]
        assert all(np.isin(r, many).all() and 4321 not in r for r in a.rows)
        answers.append([r.tolist() for r in a.rows])
    assert answers[0] == answers[1]  # memory-mapped or not


def test_the_flat_index_filtered_equals_exact_search(data, tmp_path: Path) -> None:
    x, q = data
    x = x[:5000]
    idx = save_index(tmp_path / "idx", x, "Flat")
    rows = np.arange(3, 5000, 50)
    found = idx.search(q[:20], 10, allow=rows)
    scores, truth = exact_allowed(x, q[:20], rows, 10)
    assert [r.tolist() for r in found.rows] == truth.tolist()
    np.testing.assert_allclose(np.stack(found.scores), scores, rtol=1e-5)


def test_a_bad_filter_is_one_clear_error(data, auto: SimilarityIndex) -> None:
    q = data[1][:1]
    for bad, match in [(np.array([5, 3]), "sorted, unique"), (np.array([3, 3]), "sorted, unique"),
                       (np.array([-1, 4]), "sorted, unique"), (np.array([0, N]), f"0..{N - 1}"),
                       (np.zeros(10, bool), f"this index has {N} rows"),
                       (np.array([0.5, 1.5]), "bool mask"), (np.zeros((2, 2), np.int64), "1-d")]:
        with pytest.raises(LakelensError, match=match):
            auto.search(q, 10, allow=bad)
    assert len(auto.search(q, 10, allow=[0, 1, 2]).rows[0]) == 3  # a list of ints will do


def test_the_row_to_list_map_follows_added_rows(data, tmp_path: Path) -> None:
    """`lakelens index update` adds to the opened index: the next filtered search sees the
    new rows in the lists plan too."""
    x, q = data
    idx = save_index(tmp_path / "idx", x[:20_000], "IVF64_HNSW32,PQ16x4fsr,Refine(SQfp16)", queries=q[:50])
    fs = FilteredSearch(idx.index)
    assert fs.row_lists().shape == (20_000,)
    idx.index.add(x[20_000:21_000])
    lists = fs.row_lists()
    assert lists.shape == (21_000,)
    ivf = faiss.extract_index_ivf(idx.index)
    assigned = ivf.quantizer.search(x[20_000:21_000], 1)[1].ravel()
    assert (lists[20_000:] == assigned).mean() > 0.99  # HNSW may pick a near-tie list
    near = fs.search_lists(q[:5], 10, np.arange(21_000), 64)[1]
    assert (near >= 0).all() and (near < 21_000).all()
