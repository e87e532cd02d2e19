"""Build a FAISS index from blocks of vectors: choose, train on a sample, add, tune, measure.

Plain FAISS and numpy. Row numbers are the FAISS ids (0..n-1, in add order); the caller
keeps the row -> image mapping (ids.parquet).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from models.errors import LakelensError

logger = logging.getLogger(__name__)

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
FLAT_MAX_ROWS = 100_000  # exact search stays fast enough below this
DEFAULT_MEMORY_BUDGET = 16 * 2**30  # bytes the index may take in RAM
TARGET_RECALL = 0.95
RECALL_K = 10

Blocks = Callable[[], Iterator[np.ndarray]]  # a re-iterable stream of float32[m, dim]


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


def train_and_add(index: faiss.Index, sample: np.ndarray, blocks: Iterable[np.ndarray], *,
                  gpu: bool) -> faiss.Index:
    """Train on `sample` (if the index needs it) and add every block; on the GPU(s) when
    asked and supported, then copied back to a CPU index."""
    work, on_gpu = index, False
    if gpu:
        try:
            work = faiss.index_cpu_to_all_gpus(index)
            on_gpu = True
        except (RuntimeError, AttributeError) as e:  # e.g. fast-scan PQ has no GPU version
            logger.warning("this index type cannot run on the GPU (%s); building on CPU",
                           str(e).strip().splitlines()[-1][:120])
    started = time.perf_counter()
    if not work.is_trained:
        logger.info("training on %d sampled vectors%s", len(sample), " (GPU)" if on_gpu else "")
        work.train(np.ascontiguousarray(sample, dtype=np.float32))
    added = 0
    for block in blocks:
        work.add(np.ascontiguousarray(block, dtype=np.float32))
        added += len(block)
        logger.info("added %d vectors (%.0f/s)", added, added / max(time.perf_counter() - started, 1e-9))
    return faiss.index_gpu_to_cpu(work) if on_gpu else work


def set_search_params(index: faiss.Index, params: dict) -> None:
    """Apply stored search parameters (nprobe, k_factor) to a CPU index."""
    if "nprobe" in params and _ivf(index) is not None:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(params["nprobe"]))
    if "k_factor" in params:
        refine = _refine(index)
        if refine is not None:
            refine.k_factor = float(params["k_factor"])


def _ivf(index: faiss.Index):
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
    ivf = _ivf(index)
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
    ivf = _ivf(target)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()
    return np.stack([target.reconstruct(int(r)) for r in rows]) if len(rows) else np.zeros(
        (0, index.d), np.float32)


def sample_rows(blocks: Iterable[np.ndarray], n: int, total: int, seed: int = 0) -> np.ndarray:
    """A uniform sample of n vectors from a stream of `total` (one pass, sorted positions)."""
    rng = np.random.default_rng(seed)
    wanted = np.sort(rng.choice(total, size=min(n, total), replace=False))
    out, start, j = [], 0, 0
    for block in blocks:
        end = start + len(block)
        k = np.searchsorted(wanted, end)
        if k > j:
            out.append(block[wanted[j:k] - start])
            j = k
        start = end
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
