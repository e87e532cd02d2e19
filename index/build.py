"""Build a FAISS index from blocks of vectors: choose, train on a sample, add, tune, measure.

Plain FAISS and numpy. Row numbers are the FAISS ids (0..n-1, in add order); the caller
keeps the row -> image mapping (index.versions: ids-*.parquet).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# OpenMP threads that spin while waiting (libgomp's default) stall FAISS when other
# processes share the cores: training an IVF index next to a busy annotate run took 10x
# longer (k-means and PQ training run many short parallel loops). Sleep instead, unless
# told otherwise; this only takes effect where FAISS is first imported through here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from models.errors import LakelensError  # noqa: E402

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
FLAT_MAX_ROWS = 100_000  # exact search stays fast enough below this
DEFAULT_MEMORY_BUDGET = 16 * 2**30  # bytes the index may take in RAM
TARGET_RECALL = 0.95
TUNE_MARGIN = 0.01  # tune() aims this much higher: 1,000 queries measure recall to about +-0.01
RECALL_K = 10
HNSW_M = 32  # links per node of the HNSW graph over the IVF centroids
MIN_TRAIN_SAMPLE = 50_000
MAX_TRAIN_SAMPLE = 2**18  # k-means on more than ~256k vectors costs more than it brings
TRAIN_PER_LIST = 39  # what k-means asks for per centroid (trains on fewer above MAX_TRAIN_SAMPLE)
K_FACTORS = (2, 4, 8, 16, 32)  # re-rank shortlists tried by tune(): k * k_factor candidates
TUNE_LOCAL_EVALS = 20  # searches of tune()'s descent, after its half-octave anchor
# What tune() weighs the work of a search with: nanoseconds on one core (x86 with AVX-512,
# FAISS 1.15, the `auto` index of 1M x 256 clustered vectors; timed on shared cores, so
# about +-30%), per byte read or per dimension.
SCAN_NS_PER_BYTE = 0.06  # codes of the probed lists, read in order: ~4 ns a 4-bit PQ128 code
HNSW_NS_PER_DIM = 0.4  # one float distance of the coarse quantizer's graph search, hops included
REFINE_NS_PER_BYTE = 0.5  # one re-ranked candidate, read at random: ~250 ns for fp16 x 256


@dataclass(frozen=True)
class Choice:
    factory: str
    reason: str


def ivf_lists(n: int) -> int:
    """Inverted lists for n vectors: ~2*sqrt(n), a power of two (k-means cost grows with
    lists x training sample, and an HNSW graph over the centroids keeps probing cheap)."""
    nlist = int(min(65_536, max(64, 2 ** round(math.log2(2 * math.sqrt(max(n, 1)))))))
    return max(1, min(nlist, n // TRAIN_PER_LIST))


def code_tiers(dim: int) -> list[tuple[str, float, str]]:
    """Per-vector codes for a compressed IVF index, most accurate first: (factory suffix,
    bytes per vector including the 8-byte id, description).

    The shortlist is 4-bit fast-scan PQ (dim/2 sub-quantizers of 2 dims: 2 bits per dim,
    scanned with SIMD lookups); the re-rank, where it fits, uses half-precision floats:
    8-bit scalar quantization (a quarter of the floats) rounds distances by about as much
    as the gaps between close neighbours, which caps recall@10 near 0.96 on clustered
    embeddings, while fp16 stays within 0.002 of exact search.
    """
    tiers: list[tuple[str, float, str]] = []
    for per_sub in (2, 4):  # dims per 4-bit PQ sub-quantizer: 2 or 1 bits per dim
        m = dim // per_sub
        if not m or dim % per_sub:
            continue
        pq, pq_bytes = f"PQ{m}x4fsr", math.ceil(m / 2)
        if per_sub == 2:
            tiers += [(f"{pq},Refine(SQfp16)", pq_bytes + 2 * dim + 8,
                       f"{m}x4-bit PQ codes shortlist and half-precision vectors re-rank"),
                      (f"{pq},Refine(SQ8)", pq_bytes + dim + 8,
                       f"{m}x4-bit PQ codes shortlist and 8-bit scalar-quantized vectors re-rank")]
        tiers.append((pq, pq_bytes + 8, f"{m}x4-bit PQ codes only, no re-rank"))
    if not tiers:  # odd dim: no even split into sub-quantizers
        tiers = [("SQfp16", 2 * dim + 8, "half-precision vectors"),
                 ("SQ8", dim + 8, "8-bit scalar-quantized vectors"),
                 ("SQ4", math.ceil(dim / 2) + 8, "4-bit scalar-quantized vectors")]
    return tiers


def choose_factory(n: int, dim: int, *, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                   flat_max_rows: int | None = None) -> Choice:
    """The `auto` index for n vectors of `dim`, and why.

    Up to FLAT_MAX_ROWS vectors: Flat (exact). Above: IVF with an HNSW graph over its
    centroids, holding compressed codes: the most accurate code whose estimated size fits
    `memory_budget` (see code_tiers: fast-scan PQ re-ranked with fp16 vectors, then with
    SQ8 ones, then PQ alone, then half as many PQ sub-quantizers). The float vectors
    themselves are never kept: fp16 re-ranks as well at half their size.
    """
    flat_max = FLAT_MAX_ROWS if flat_max_rows is None else flat_max_rows
    if n <= flat_max:
        return Choice("Flat", f"{n} vectors <= {flat_max}: exact search is fast enough")
    nlist = ivf_lists(n)
    coarse = f"IVF{nlist}_HNSW{HNSW_M}"
    fixed = nlist * (dim * 4 + HNSW_M * 2 * 4)  # centroids and their graph
    gib, budget = n * dim * 4 / 2**30, memory_budget / 2**30
    tiers = code_tiers(dim)
    for codes, per_vector, what in tiers:
        need = fixed + n * per_vector
        if need <= memory_budget:
            return Choice(f"{coarse},{codes}",
                          f"{n} vectors ({gib:.2f} GiB as floats): {nlist} inverted lists "
                          f"(~2*sqrt(n)) probed through an HNSW graph; {what} "
                          f"({need / 2**30:.2f} GiB, within the {budget:g} GiB budget)")
    codes, per_vector, what = tiers[-1]
    need = fixed + n * per_vector
    return Choice(f"{coarse},{codes}",
                  f"{n} vectors ({gib:.2f} GiB as floats): even the smallest code ({what}, "
                  f"{need / 2**30:.2f} GiB) exceeds the {budget:g} GiB budget")


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


def train_sample_size(index: faiss.Index) -> int:
    """Default training sample: TRAIN_PER_LIST vectors per IVF list, at least
    MIN_TRAIN_SAMPLE and at most MAX_TRAIN_SAMPLE."""
    ivf = ivf_of(index)
    per_lists = TRAIN_PER_LIST * ivf.nlist if ivf is not None else 0
    return min(MAX_TRAIN_SAMPLE, max(MIN_TRAIN_SAMPLE, per_lists))


def train_and_add(index: faiss.Index, sample: Callable[[], np.ndarray],
                  blocks: Iterable[np.ndarray], *, gpu: bool,
                  presize: Iterable[np.ndarray] | None = None, reserve: int = 0,
                  on_trained: Callable[[faiss.Index], None] | None = None) -> faiss.Index:
    """Train on sample() (drawn only if the index needs training, and dropped before
    adding) and add every block; on the GPU(s) when asked and supported, then copied back
    to a CPU index.

    presize: the same vectors as `blocks`, streamed once more before adding, so that a CPU
    IVF index can size each inverted list exactly (growing lists by doubling costs up to
    twice their size in memory) and add with the assignments already computed.
    on_trained: given a CPU copy of the trained, still empty index (what later updates
    encode their vectors with) before anything is added.
    reserve: the number of vectors that will be added, to allocate flat code arrays (Flat,
    SQ, a re-rank index) once at their final size instead of growing them by doubling.
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
        started = time.perf_counter()
        ivf = ivf_of(work) if not on_gpu else None
        if ivf is not None and len(train) < ivf.cp.min_points_per_centroid * ivf.nlist:
            # A capped sample (MAX_TRAIN_SAMPLE) is enough; say so instead of a warning.
            ivf.cp.min_points_per_centroid = max(1, len(train) // max(ivf.nlist, 1))
        try:
            work.train(train)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1][:200]
            raise LakelensError(f"cannot train {type(faiss.downcast_index(index)).__name__} on "
                                f"{len(train)} vectors: {first}") from e
        logger.info("trained on %d sampled vectors in %.1f s%s", len(train),
                    time.perf_counter() - started, " (GPU)" if on_gpu else "")
        del train
    if on_trained is not None:
        on_trained(faiss.index_gpu_to_cpu(work) if on_gpu else faiss.clone_index(work))
    if reserve and not on_gpu:
        reserve_codes(work, reserve)
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


def reserve_codes(index: faiss.Index, n: int) -> None:
    """Allocate the flat code arrays of `index` (Flat, SQ, PQ, or a re-rank index's) for n
    vectors now: adding in blocks would grow them by doubling, holding up to twice their
    size (and old plus new while copying)."""
    for part in (index, getattr(_refine(index), "refine_index", None)):
        down = faiss.downcast_index(part) if part is not None else None
        if isinstance(down, faiss.IndexFlatCodes) and down.ntotal == 0 and n > 0:
            down.codes.resize(n * down.code_size)  # capacity for n...
            down.codes.resize(0)  # ...kept while the size goes back to 0


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
    """Apply stored search parameters (nprobe, quantizer_efSearch, k_factor) to a CPU index."""
    ivf = ivf_of(index)
    if "nprobe" in params and ivf is not None:
        ivf.nprobe = int(params["nprobe"])
    if "quantizer_efSearch" in params and ivf is not None:
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = int(params["quantizer_efSearch"])
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


class ExactNeighbors:
    """Exact top-k of fixed queries over vectors streamed once, block by block (row
    numbers in stream order) -- fed from the pass that adds them to the index, so that no
    second pass over the vectors and never all of them at once.

    exclude: one row per query that must not count as its neighbour (a query drawn from
    the indexed rows would otherwise find itself): it is left out of the answers here and
    in search_excluding(), so recall is measured as for a query the index has not seen.
    """

    def __init__(self, queries: np.ndarray, k: int, metric: str, *,
                 exclude: np.ndarray | None = None, start: int = 0):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k, self.exclude = k, exclude
        self.width = k + (exclude is not None)
        self.heap = faiss.ResultHeap(len(self.queries), self.width,
                                     keep_max=faiss.is_similarity_metric(METRICS[metric]))
        self.flat = faiss.IndexFlat(self.queries.shape[1], METRICS[metric])
        self.rows = start  # row number of the next vector added (a shard starts past 0)

    def add(self, block: np.ndarray) -> None:
        x = np.ascontiguousarray(block, dtype=np.float32)
        if len(x) and len(self.queries):
            self.flat.add(x)
            dist, ids = self.flat.search(self.queries, self.width)
            self.flat.reset()
            ids[ids >= 0] += self.rows
            self.heap.add_result(dist, ids)
        self.rows += len(x)

    def result(self) -> np.ndarray:
        """int64[q, k]: the exact neighbours' row numbers (-1 past the end)."""
        self.heap.finalize()
        return drop_rows(self.heap.I, self.exclude, self.k)

    def partial(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of this stream's best, to be merged with other shards' (merge())."""
        self.heap.finalize()
        return self.heap.D.copy(), self.heap.I.copy()

    def merge(self, parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        """Take in other shards' partial() results (nothing may be added after)."""
        for scores, rows in parts:
            self.heap.add_result(np.ascontiguousarray(scores, np.float32),
                                 np.ascontiguousarray(rows, np.int64))


def drop_rows(found: np.ndarray, exclude: np.ndarray | None, k: int) -> np.ndarray:
    """found[:, :k] with each query's excluded row taken out (the row after it moves up)."""
    if exclude is None:
        return np.ascontiguousarray(found[:, :k])
    out = np.full((len(found), k), -1, np.int64)
    for i, (row, skip) in enumerate(zip(found, exclude, strict=True)):
        kept = row[row != skip][:k]
        out[i, :len(kept)] = kept
    return out


def search_excluding(index: faiss.Index, queries: np.ndarray, k: int,
                     exclude: np.ndarray | None = None) -> np.ndarray:
    """Row numbers of the top k of each query, its excluded row (if any) left out."""
    if exclude is None:
        return index.search(queries, k)[1]
    return drop_rows(index.search(queries, k + 1)[1], exclude, k)


def ground_truth(queries: np.ndarray, blocks: Iterable[np.ndarray], k: int, metric: str, *,
                 exclude: np.ndarray | None = None) -> np.ndarray:
    """Exact top-k row numbers of `queries` over the streamed blocks (int64[q, k])."""
    exact = ExactNeighbors(queries, k, metric, exclude=exclude)
    for block in blocks:
        exact.add(block)
    return exact.result()


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / k per query (k = truth's width; -1 entries never match)."""
    k = truth.shape[1]
    hits = sum(len(set(f[:k].tolist()) & set(t.tolist()) - {-1}) for f, t in zip(found, truth, strict=True))
    return hits / (len(truth) * k) if len(truth) else 1.0


@dataclass(frozen=True)
class Trial:
    """One setting of the search parameters, measured on the held-out queries: its
    recall@k and its cost, the search time per query estimated from the work FAISS did
    (codes scanned, coarse-graph distances, candidates re-ranked; see search_cost_ns), and
    that work per query."""
    params: dict
    recall: float
    cost_ns: float
    scanned: float = 0.0
    graph_distances: float = 0.0


def search_cost_ns(index: faiss.Index, *, scanned: float, graph_distances: float,
                   reranked: float) -> float:
    """Estimated nanoseconds per query of a search that scanned `scanned` codes of the
    inverted lists, computed `graph_distances` float distances in the HNSW coarse
    quantizer and re-ranked `reranked` candidates (each per query), from the bytes each
    step reads (SCAN_NS_PER_BYTE, HNSW_NS_PER_DIM, REFINE_NS_PER_BYTE)."""
    ivf = ivf_of(index)
    refine = _refine(index)
    scan_bytes = int(ivf.code_size) if ivf is not None else 0
    refine_bytes = 0
    if refine is not None:
        refine_bytes = int(getattr(faiss.downcast_index(refine.refine_index), "code_size", 4 * index.d))
    return (SCAN_NS_PER_BYTE * scan_bytes * scanned + HNSW_NS_PER_DIM * index.d * graph_distances
            + REFINE_NS_PER_BYTE * refine_bytes * reranked)


def measure(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, params: dict, *,
            exclude: np.ndarray | None = None) -> Trial:
    """Search `queries` with `params` applied (left applied): recall@k against `truth`
    (k = its width) and the estimated cost per query of a top-k search.

    With `exclude` the search asks for k + 1 neighbours (a query's own row is dropped
    after); a re-ranking index's shortlist is then widened by one (k_factor scaled), so
    that it holds k * k_factor other rows, as a top-k search of an unseen query does --
    not (k + 1) * k_factor, which would measure a better recall than searches get.
    The work is read from FAISS's process-wide counters (indexIVF_stats, hnsw_stats),
    reset here: a search in another thread meanwhile would add to it.
    """
    k, nq = truth.shape[1], max(len(queries), 1)
    applied = dict(params)
    if exclude is not None and "k_factor" in params and _refine(index) is not None:
        applied["k_factor"] = (k * float(params["k_factor"]) + 1.5) / (k + 1)  # int((k+1)*kf') = k*kf + 1
    set_search_params(index, applied)
    faiss.cvar.indexIVF_stats.reset()
    faiss.cvar.hnsw_stats.reset()
    found = search_excluding(index, queries, k, exclude)
    ivf = ivf_of(index)
    scanned = faiss.cvar.indexIVF_stats.ndis / nq
    if ivf is not None and not scanned:  # an IVF kind that keeps no count: the lists' mean size
        scanned = ivf.nprobe * ivf.ntotal / max(ivf.nlist, 1)
    graph = faiss.cvar.hnsw_stats.ndis / nq if ivf is not None else 0.0
    reranked = k * float(params["k_factor"]) if "k_factor" in params and _refine(index) else 0.0
    set_search_params(index, params)
    cost = search_cost_ns(index, scanned=scanned, graph_distances=graph, reranked=reranked)
    return Trial(dict(params), recall_at_k(found, truth), cost, scanned, graph)


def _ladder(lo: int, hi: int, per_octave: int, extra: Iterable[int] = ()) -> list[int]:
    """Integers from lo to hi, `per_octave` geometric steps an octave (rounded), plus `extra`."""
    steps = range(per_octave * int(math.log2(max(hi, 1))) + per_octave + 1)
    return sorted({v for v in (round(2 ** (i / per_octave)) for i in steps) if lo <= v <= hi}
                  | {lo, hi} | {v for v in extra if lo <= v <= hi})


def tune(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, *,
         target: float = TARGET_RECALL + TUNE_MARGIN, exclude: np.ndarray | None = None,
         max_evals: int = TUNE_LOCAL_EVALS) -> tuple[dict, float]:
    """The cheapest search parameters found reaching `target` recall@k on the held-out
    queries (or the best recall found), and the recall they give; left applied to `index`.

    Cost is the estimated search time per query from the work FAISS reports for the
    held-out queries (measure(), search_cost_ns): deterministic, unlike wall time on
    shared cores, so that the same index always gets the same parameters.

    1. Anchor: nprobe grows from 1 by half octaves (1, 2, 3, 4, 6, 8, 11, 16, ...) with
       the widest re-rank shortlist (largest K_FACTORS) and, for an HNSW coarse quantizer,
       efSearch = max(32, 2 * nprobe), until the target is reached: at most
       2 * log2(nlist) + 2 searches.
    2. Descent: from the anchor, on ladders of nprobe (eighth octaves), efSearch (quarter
       octaves, from 16) and k_factor (K_FACTORS), neighbouring settings -- one parameter a
       step lower, or one lower and another a step higher -- predicted cheaper than the
       best so far are searched, cheapest first; the first that reaches the target at a
       lower measured cost becomes the best and the descent goes on from it. A setting
       no higher than one that missed the target is skipped unsearched (recall grows with
       each parameter). At most `max_evals` searches, so at most
       2 * log2(nlist) + 2 + max_evals in all (48 at 8192 lists).
    exclude: see ExactNeighbors and measure().
    """
    ivf = ivf_of(index)
    refine = _refine(index) is not None
    evals = 0
    done: dict[tuple, Trial] = {}

    def run(params: dict) -> Trial:
        nonlocal evals
        key = tuple(sorted(params.items()))
        if key not in done:
            evals += 1
            done[key] = measure(index, queries, truth, params, exclude=exclude)
            logger.debug("tune: %s recall %.4f, ~%.1f us", params, done[key].recall, done[key].cost_ns / 1e3)
        return done[key]

    if ivf is None:
        trial = run({"k_factor": float(K_FACTORS[1])} if refine else {})
        if refine and trial.recall < target:
            trial = max(trial, run({"k_factor": float(K_FACTORS[-1])}), key=lambda t: t.recall)
        set_search_params(index, trial.params)
        return trial.params, trial.recall
    hnsw = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)
    kfs: list[float | None] = [float(f) for f in K_FACTORS] if refine else [None]

    def params_of(nprobe: int, ef: int, kf: float | None) -> dict:
        out: dict = {"nprobe": int(nprobe)}
        if hnsw:
            out["quantizer_efSearch"] = int(max(ef, nprobe))  # FAISS searches at least nprobe
        if kf is not None:
            out["k_factor"] = kf
        return out

    best_recall: Trial | None = None
    anchor: Trial | None = None
    for nprobe in _ladder(1, ivf.nlist, 2):
        trial = run(params_of(nprobe, max(32, 2 * nprobe), kfs[-1]))
        if best_recall is None or trial.recall > best_recall.recall:
            best_recall = trial
        if trial.recall >= target:
            anchor = trial
            break
    if anchor is None:
        set_search_params(index, best_recall.params)
        logger.info("tune: no setting reaches recall %.3f in %d searches; best %s (recall %.4f)",
                    target, evals, best_recall.params, best_recall.recall)
        return best_recall.params, best_recall.recall

    a_probe = anchor.params["nprobe"]
    a_ef = anchor.params.get("quantizer_efSearch", 0)
    probes = _ladder(1, ivf.nlist, 8, [a_probe])
    efs = _ladder(16, max(16, ivf.nlist, a_ef), 4, [a_ef]) if hnsw else [0]
    axes = (probes, efs, kfs)
    state = (probes.index(a_probe), efs.index(a_ef) if hnsw else 0, len(kfs) - 1)
    # What the descent learns: codes scanned per probed list, coarse-graph distances per
    # efSearch, settings that missed the target.
    per_probe = anchor.scanned / a_probe or ivf.ntotal / max(ivf.nlist, 1)
    graph: dict[int, float] = {}
    seen: dict[tuple, Trial] = {}
    failed: list[tuple] = []

    def trial_at(s: tuple) -> Trial:
        if s not in seen:
            t = run(params_of(probes[s[0]], efs[s[1]], kfs[s[2]]))
            seen[s] = t
            if hnsw:
                graph[t.params["quantizer_efSearch"]] = t.graph_distances
            if t.recall < target:
                failed.append(s)
        return seen[s]

    seen[state] = anchor
    if hnsw:
        graph[a_ef] = anchor.graph_distances

    def predicted(s: tuple) -> float:
        nprobe, kf = probes[s[0]], kfs[s[2]]
        dists = 0.0
        if hnsw:
            ef = max(efs[s[1]], nprobe)
            known = min(graph, key=lambda e: (abs(math.log(e / ef)), e))
            dists = graph[known] * math.sqrt(ef / known)  # grows about as sqrt(efSearch)
        return search_cost_ns(index, scanned=per_probe * nprobe, graph_distances=dists,
                              reranked=RECALL_K * kf if kf is not None else 0.0)

    moves = [m for m in ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (-1, 1, 0), (-1, 0, 1), (1, -1, 0),
                         (1, 0, -1), (0, -1, 1), (0, 1, -1))
             if all(len(axis) > 1 or not d for axis, d in zip(axes, m, strict=True))]
    best = anchor
    start = evals
    while evals - start < max_evals:
        steps = {tuple(i + d for i, d in zip(state, m, strict=True)) for m in moves}
        near = [s for s in steps if all(0 <= i < len(axis) for i, axis in zip(s, axes, strict=True))
                and s not in seen
                and not any(all(i <= j for i, j in zip(s, f, strict=True)) for f in failed)]
        ranked = sorted((predicted(s), s) for s in near)
        moved = False
        for cost, s in ranked:
            if cost >= best.cost_ns or evals - start >= max_evals:
                break
            t = trial_at(s)
            if t.recall >= target and t.cost_ns < best.cost_ns:
                best, state, moved = t, s, True
                break
        if not moved:
            break
    set_search_params(index, best.params)
    logger.info("tune: %s (recall %.4f, ~%.0f us a query) in %d searches; the anchor %s: recall %.4f, "
                "~%.0f us", best.params, best.recall, best.cost_ns / 1e3, evals, anchor.params,
                anchor.recall, anchor.cost_ns / 1e3)
    return best.params, best.recall


def reconstruct(index: faiss.Index, rows: np.ndarray) -> np.ndarray:
    """The stored vectors of `rows` (approximate for compressed indexes)."""
    rows = np.asarray(rows, dtype=np.int64)
    refine = _refine(index)
    target = faiss.downcast_index(refine.refine_index) if refine is not None else index
    ivf = ivf_of(target)
    if isinstance(faiss.downcast_index(ivf) if ivf is not None else None, faiss.IndexIVFFastScan):
        # faiss 1.15 crashes reconstructing from a fast-scan IVF index read from disk
        raise LakelensError("this index keeps only fast-scan PQ codes (a small --memory-gb), "
                            "which cannot be turned back into vectors: query by vector or image")
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
