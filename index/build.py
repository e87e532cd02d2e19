"""Build a FAISS index from blocks of vectors: choose, train on a sample, add, tune, measure.

Plain FAISS and numpy. Row numbers are the FAISS ids (0..n-1, in add order); the caller
keeps the row -> image mapping (ids.parquet).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from models.errors import LakelensError

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
FLAT_MAX_ROWS = 100_000  # exact search stays fast enough below this
DEFAULT_MEMORY_BUDGET = 16 * 2**30  # bytes the index may take in RAM
TARGET_RECALL = 0.95
RECALL_K = 10

@dataclass(frozen=True)
class Choice:
    factory: str
    reason: str


def choose_factory(n: int, dim: int, *, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Choice:
    """The `auto` index for n vectors of `dim`, and why."""
    if n <= FLAT_MAX_ROWS:
        return Choice("Flat", f"{n} vectors <= {FLAT_MAX_ROWS}: exact search is fast enough")
    nlist = int(min(65_536, max(256, 2 ** round(math.log2(4 * math.sqrt(n))))))
    nlist = min(nlist, max(1, n // 39))  # k-means wants >= 39 points per centroid
    flat_bytes = n * dim * 4
    if flat_bytes <= memory_budget:
        return Choice(f"IVF{nlist},Flat",
                      f"{n} vectors: inverted lists ({nlist} = ~4*sqrt(n)) over exact float "
                      f"vectors ({flat_bytes / 2**30:.1f} GiB fits the "
                      f"{memory_budget / 2**30:.0f} GiB budget)")
    m = next(m for m in (dim // 2, dim // 4, dim // 8, dim) if m and dim % m == 0 and m % 2 == 0)
    return Choice(f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)",
                  f"{n} vectors: float vectors ({flat_bytes / 2**30:.1f} GiB) exceed the "
                  f"{memory_budget / 2**30:.0f} GiB budget, so 4-bit PQ codes shortlist and "
                  "8-bit scalar-quantized vectors re-rank (~1.25 bytes per dim)")


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu, and with faiss-gpu on a machine without one)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def use_gpu(mode: str) -> bool:
    """Resolve --gpu auto|on|off against the GPUs present."""
    if mode not in ("auto", "on", "off"):
        raise LakelensError(f"--gpu {mode!r}: choose from auto, on, off")
    n = gpu_count()
    if mode == "on" and n == 0:
        raise LakelensError("--gpu on, but FAISS sees no GPU (faiss-cpu installed, or no "
                            "CUDA device); use --gpu auto or off")
    return mode != "off" and n > 0


def new_index(factory: str, dim: int, metric: str) -> faiss.Index:
    if metric not in METRICS:
        raise LakelensError(f"--metric {metric!r}: choose from {', '.join(METRICS)}")
    try:
        return faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1][:200]
        raise LakelensError(f"--factory {factory!r} is not a valid FAISS factory string: {first}") from e


def train_and_add(index: faiss.Index, sample: Callable[[], np.ndarray],
                  blocks: Iterable[np.ndarray], *, gpu: bool,
                  presize: Iterable[np.ndarray] | None = None) -> faiss.Index:
    """Train on sample() (drawn only if the index needs training, and dropped before
    adding) and add every block; on the GPU(s) when asked and supported, then copied back
    to a CPU index.

    presize: the same vectors as `blocks`, streamed once more before adding, so that a CPU
    IVF index can size each inverted list exactly (growing lists by doubling costs up to
    twice their size in memory) and add with the assignments already computed.
    """
    work, on_gpu = index, False
    if gpu:
        try:
            work = faiss.index_cpu_to_all_gpus(index)
            on_gpu = True
        except (RuntimeError, AttributeError) as e:  # e.g. fast-scan PQ has no GPU version
            logger.warning("this index type cannot run on the GPU (%s); building on CPU",
                           str(e).strip().splitlines()[-1][:120])
    if not work.is_trained:
        train = np.ascontiguousarray(sample(), dtype=np.float32)
        logger.info("training on %d sampled vectors%s", len(train), " (GPU)" if on_gpu else "")
        try:
            work.train(train)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1][:200]
            raise LakelensError(f"cannot train {type(faiss.downcast_index(index)).__name__} on "
                                f"{len(train)} vectors: {first}") from e
        del train
    ivf = _plain_ivf(work) if presize is not None and not on_gpu else None
    assignments = _presize_lists(ivf, presize) if ivf is not None else None
    started, added = time.perf_counter(), 0
    last_log = started
    for block in blocks:
        x = np.ascontiguousarray(block, dtype=np.float32)
        if assignments is not None:
            a = np.ascontiguousarray(assignments[added:added + len(x)])
            ivf.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(a))
        else:
            work.add(x)
        added += len(x)
        now = time.perf_counter()
        if now - last_log >= PROGRESS_EVERY_S:  # progress on long adds, not a line per block
            logger.info("added %d vectors (%.0f/s)", added, added / max(now - started, 1e-9))
            last_log = now
    logger.info("added %d vectors in %.1f s", added, time.perf_counter() - started)
    return faiss.index_gpu_to_cpu(work) if on_gpu else work


def _plain_ivf(index: faiss.Index):
    """The index itself if it is an IVF index over plain array lists (IVF-Flat, IVF-SQ)."""
    down = faiss.downcast_index(index)
    if isinstance(down, faiss.IndexIVFFlat | faiss.IndexIVFScalarQuantizer) and isinstance(
            faiss.downcast_InvertedLists(down.invlists), faiss.ArrayInvertedLists):
        return down
    return None


def _presize_lists(ivf, blocks: Iterable[np.ndarray]) -> np.ndarray:
    """Assign every vector to its list, reserve each list's exact size; returns the
    assignments (int64[n]) for add_core."""
    assigned = [ivf.quantizer.assign(np.ascontiguousarray(b, dtype=np.float32), 1).ravel()
                for b in blocks]
    assignments = np.concatenate(assigned).astype(np.int64) if assigned else np.zeros(0, np.int64)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    for list_no, size in enumerate(np.bincount(assignments, minlength=ivf.nlist)):
        if size:
            lists.resize(list_no, int(size))  # allocates exactly `size` entries...
            lists.resize(list_no, 0)  # ...and keeps them as capacity
    return assignments


def set_search_params(index: faiss.Index, params: dict) -> None:
    """Apply stored search parameters (nprobe, k_factor) to a CPU index."""
    if "nprobe" in params and ivf_of(index) is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(params["nprobe"]))
    if "k_factor" in params:
        refine = _refine(index)
        if refine is not None:
            refine.k_factor = float(params["k_factor"])


def ivf_of(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _refine(index: faiss.Index):
    down = faiss.downcast_index(index)
    return down if isinstance(down, faiss.IndexRefine) else None


def ground_truth(queries: np.ndarray, blocks: Iterable[np.ndarray], k: int, metric: str) -> np.ndarray:
    """Exact top-k row numbers of `queries` over the streamed blocks (int64[q, k])."""
    _, ids = knn_ground_truth(np.ascontiguousarray(queries, dtype=np.float32),
                              (np.ascontiguousarray(b, dtype=np.float32) for b in blocks), k,
                              metric_type=METRICS[metric], ngpu=0)
    return ids


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / k per query (k = truth's width; -1 entries never match)."""
    k = truth.shape[1]
    hits = sum(len(set(f[:k].tolist()) & set(t.tolist()) - {-1}) for f, t in zip(found, truth, strict=True))
    return hits / (len(truth) * k) if len(truth) else 1.0


def tune(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, *,
         target: float = TARGET_RECALL) -> tuple[dict, float]:
    """The cheapest search parameters reaching `target` recall@k on the held-out queries
    (or the best found), and the recall they give."""
    k = truth.shape[1]
    ivf = ivf_of(index)
    params: dict = {}
    if _refine(index) is not None:
        params["k_factor"] = 4.0
    if ivf is None:
        set_search_params(index, params)
        return params, recall_at_k(index.search(queries, k)[1], truth)
    best = (0.0, params)
    nprobe = 1
    while nprobe <= ivf.nlist:
        trial = {**params, "nprobe": nprobe}
        set_search_params(index, trial)
        recall = recall_at_k(index.search(queries, k)[1], truth)
        if recall > best[0]:
            best = (recall, trial)
        if recall >= target:
            break
        nprobe *= 2
    set_search_params(index, best[1])
    return best[1], best[0]


def reconstruct(index: faiss.Index, rows: np.ndarray) -> np.ndarray:
    """The stored vectors of `rows` (approximate for compressed indexes)."""
    rows = np.asarray(rows, dtype=np.int64)
    refine = _refine(index)
    target = faiss.downcast_index(refine.refine_index) if refine is not None else index
    ivf = ivf_of(target)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()
    return np.stack([target.reconstruct(int(r)) for r in rows]) if len(rows) else np.zeros(
        (0, index.d), np.float32)


def sample_positions(total: int, n: int, seed: int = 0) -> np.ndarray:
    """n distinct row positions out of `total`, sorted, seeded."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=min(n, total), replace=False))


def take_rows(blocks: Iterable[np.ndarray], positions: np.ndarray) -> np.ndarray:
    """The rows at sorted `positions` of a stream of blocks (one pass)."""
    out, start, j = [], 0, 0
    for block in blocks:
        end = start + len(block)
        k = int(np.searchsorted(positions, end))
        if k > j:
            out.append(np.array(block[positions[j:k] - start], dtype=np.float32))
            j = k
        start = end
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
