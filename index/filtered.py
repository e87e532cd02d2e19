"""Filtered search: the nearest rows among an allowed subset of an index's rows.

A filter is a sorted array of allowed (and live) row numbers. Each call picks a plan:

  exact     the allowed rows' stored codes (a Flat index's floats, a re-rank index's
            SQfp16/SQ8 codes, an HNSW index's storage) are gathered block by block straight
            from the index's code array (zero-copy view, memory-mapped or not) and scored
            against the queries: cost grows with the rows allowed, not with the index.
  lists     IVF over such codes and a filter too large to score whole: the allowed rows
            are grouped by inverted list (a row -> list array, built once per opened index),
            the lists nearest each query are probed until the probed share of the filter
            makes up for its selectivity (see probes()), and the allowed rows in them are
            scored as above. Never scans a code of a row the filter leaves out.
  selector  FAISS's own search with the filter as an IDSelectorBitmap and nprobe scaled by
            probes(): other index types (IVF-Flat, IVF-PQ without re-rank, pre-transforms)
            and filters that keep most rows, where scanning all codes in the probed lists
            costs less than gathering the allowed ones.

Bounds: per call, O(allowed rows) memory (their row numbers, grouping) plus one block of
gathered codes (BLOCK_BYTES) per step; the selector plan adds a bitmap of ntotal bits. Per
opened index: one row -> list array (2 bytes a row up to 65,536 lists), built on first use.
The codes are read in place, never copied whole, so a memory-mapped index stays mapped.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import faiss
import numpy as np

from index.build import ivf_of

logger = logging.getLogger(__name__)

EXACT_MAX_BYTES = 16 * 2**20  # score every allowed row when their codes take at most this
BLOCK_BYTES = 2**20  # codes gathered per step (about L2-cache sized)
SELECTOR_MIN_FRACTION = 0.2  # filters keeping this share of rows or more: FAISS's selector
# Probed lists grow as selectivity^-PROBE_EXPONENT: a filter keeping a share s of the rows
# has its k nearest allowed rows among the ~k/s nearest of all, which spread over far more
# lists than the k nearest do (1M clustered vectors, random filters: 1/s fell short at
# s = 2-5%, s^-1.5 held recall@10 >= 0.95 from 50% down to 1%).
PROBE_EXPONENT = 1.5
PLANS = ("exact", "lists", "selector")


@dataclass(frozen=True)
class Plan:
    """How one filtered call runs: `kind` in PLANS; `nprobe` lists per query (lists and
    selector plans); `shortlist`: the selector plan's re-rank shortlist is this many times
    the tuned one (k_factor), since the allowed neighbours lie farther out, where the
    compressed codes that pick the shortlist err more."""

    kind: str
    nprobe: int | None = None
    shortlist: float = 1.0


def probes(nprobe: int, allowed: int, total: int, nlist: int) -> int:
    """Lists to probe for a filter keeping `allowed` of `total` rows, where `nprobe` lists
    reach the recall target unfiltered (at least nprobe, at most nlist)."""
    share = max(allowed, 1) / max(total, 1)
    return int(min(nlist, max(nprobe, math.ceil(nprobe * share ** -PROBE_EXPONENT))))


def bitmap(rows: np.ndarray, n: int) -> np.ndarray:
    """IDSelectorBitmap bits (little bit order) of sorted unique `rows` among n."""
    mask = np.zeros(n, bool)
    mask[rows] = True
    return np.packbits(mask, bitorder="little")


class RowCodes:
    """The stored code of every row of an index, in row order (a FAISS IndexFlatCodes whose
    position i holds row i): scores any subset of rows exactly against queries."""

    def __init__(self, flat: faiss.Index, metric: int):
        self.flat = flat
        self.metric = metric
        self.keep_max = metric == faiss.METRIC_INNER_PRODUCT
        self.sq = flat.sq if isinstance(flat, faiss.IndexScalarQuantizer) else None
        self.floats = isinstance(flat, faiss.IndexFlat)

    @staticmethod
    def of(index: faiss.Index) -> RowCodes | None:
        """The row codes of `index` (Flat/SQ, a re-rank index's refine codes, an HNSW
        index's storage), or None when it keeps none in row order."""
        down = faiss.downcast_index(index)
        metric = down.metric_type
        if metric not in (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2):
            return None
        if isinstance(down, faiss.IndexRefine):
            part = faiss.downcast_index(down.refine_index)
        elif isinstance(down, faiss.IndexHNSW):
            part = faiss.downcast_index(down.storage)
        else:
            part = down
        if not isinstance(part, faiss.IndexFlatCodes) or part.ntotal != down.ntotal:
            return None
        if part.metric_type != metric:
            return None
        return RowCodes(part, metric)

    def view(self) -> np.ndarray:
        """uint8[ntotal, code_size] over the index's own code array (no copy; fetched per
        call, since adding rows may move it)."""
        n, size = self.flat.ntotal, self.flat.code_size
        codes = self.flat.codes
        return faiss.rev_swig_ptr(codes.data(), n * size).reshape(n, size)

    def bytes_of(self, rows: int) -> int:
        return rows * self.flat.code_size

    def top_k(self, x: np.ndarray, rows: np.ndarray, k: int,
              heap: faiss.ResultHeap | None = None, which: np.ndarray | None = None) -> faiss.ResultHeap:
        """Add the scores of `rows` against queries `x` to `heap` (a new one if None), for
        query numbers `which` of the heap (all if None). Rows are gathered BLOCK_BYTES at a
        time; SQ codes are scored by FAISS's own scanner without decoding them to floats."""
        if heap is None:
            heap = faiss.ResultHeap(len(x), k, keep_max=self.keep_max)
        which = np.arange(len(x)) if which is None else which
        codes = self.view()
        step = max(64, BLOCK_BYTES // self.flat.code_size)
        scanner = None
        if self.sq is not None:
            scanner = self.sq.select_InvertedListScanner(self.metric, None, False, None, False)
            scanner.set_list(0, 0.0)
        for lo in range(0, len(rows), step):
            part = np.ascontiguousarray(rows[lo:lo + step], dtype=np.int64)
            block = np.take(codes, part, axis=0)
            if scanner is not None:
                for q, h in zip(x, which, strict=True):
                    scanner.set_query(faiss.swig_ptr(q))
                    scanner.scan_codes(len(part), faiss.swig_ptr(block), faiss.swig_ptr(part),
                                       faiss.swig_ptr(heap.D[h]), faiss.swig_ptr(heap.I[h]), heap.k)
                continue
            vecs = block.view(np.float32) if self.floats else self.flat.sa_decode(block)
            dist, found = faiss.knn(x, vecs, min(k, len(part)), metric=self.metric)
            found = np.where(found >= 0, part[np.maximum(found, 0)], -1)
            heap.add_result_subset(np.ascontiguousarray(which, dtype=np.int64), dist, found)
        return heap


class FilteredSearch:
    """Plans and runs filtered searches over one opened FAISS index."""

    def __init__(self, index: faiss.Index):
        self.index = index
        self.codes = RowCodes.of(index)
        self.ivf = ivf_of(index)
        self._lists: np.ndarray | None = None  # row -> inverted list
        self._lists_ntotal = -1
        self._lock = threading.Lock()

    def plan(self, allowed: int, nprobe: int | None) -> Plan:
        """The plan for a filter keeping `allowed` rows; nprobe: the unfiltered tuned (or
        requested) lists per query."""
        total = self.index.ntotal
        ivf = self.ivf
        if self.codes is not None and self.codes.bytes_of(allowed) <= EXACT_MAX_BYTES:
            return Plan("exact")
        if ivf is None:
            if self.codes is not None and allowed < total * SELECTOR_MIN_FRACTION:
                return Plan("exact")
            return Plan("selector")
        want = probes(nprobe or ivf.nprobe, allowed, total, ivf.nlist)
        if allowed >= total * SELECTOR_MIN_FRACTION or self.codes is None or self.row_lists() is None:
            return Plan("selector", want, math.sqrt(total / max(allowed, 1)))
        if 2 * want >= ivf.nlist:  # half the lists or more: score every allowed row
            return Plan("exact")
        return Plan("lists", want)

    def row_lists(self) -> np.ndarray | None:
        """row -> inverted list number of every row (uint16 up to 65,536 lists), read from
        the lists' ids once per opened index (again after rows were added); None when the
        lists' ids are not the row numbers 0..ntotal-1."""
        ivf, total = self.ivf, self.index.ntotal
        with self._lock:
            if self._lists_ntotal == total:
                return self._lists
            lists = faiss.downcast_InvertedLists(ivf.invlists)
            out = np.zeros(total, np.uint16 if ivf.nlist <= 2**16 else np.int32)
            seen = np.zeros(total, bool)
            ok = True
            for no in range(ivf.nlist):
                size = lists.list_size(no)
                if not size:
                    continue
                ptr = lists.get_ids(no)
                try:
                    ids = faiss.rev_swig_ptr(ptr, size)
                    if ids.min() < 0 or ids.max() >= total or seen[ids].any():
                        ok = False
                        break
                    out[ids] = no
                    seen[ids] = True
                finally:
                    lists.release_ids(no, ptr)
            self._lists = out if ok and seen.all() else None
            self._lists_ntotal = total
            if self._lists is None:
                logger.info("inverted lists do not hold rows 0..%d once each: filtered "
                            "searches use FAISS's selector", total - 1)
            return self._lists

    def search_exact(self, x: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        heap = self.codes.top_k(x, rows, k)
        heap.finalize()
        return heap.D, heap.I

    def search_lists(self, x: np.ndarray, k: int, rows: np.ndarray,
                     nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Score, per query, the allowed rows of its `nprobe` nearest lists."""
        ivf = self.ivf
        of_row = self.row_lists()[rows]
        order = np.argsort(of_row, kind="stable")  # a radix sort for 16-bit list numbers
        grouped = rows[order]
        counts = np.bincount(of_row, minlength=ivf.nlist)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        probed = self._nearest_lists(x, nprobe)
        heap = faiss.ResultHeap(len(x), k, keep_max=self.codes.keep_max)
        for i, lists in enumerate(probed):
            lists = lists[lists >= 0]
            c = counts[lists]
            total = int(c.sum())
            if not total:
                continue
            # positions of the probed lists' allowed rows in `grouped`
            at = np.repeat(starts[lists] - (np.cumsum(c) - c), c) + np.arange(total)
            self.codes.top_k(x[i:i + 1], np.sort(grouped[at]), k, heap, np.array([i]))
        heap.finalize()
        return heap.D, heap.I

    def _nearest_lists(self, x: np.ndarray, n: int) -> np.ndarray:
        """int64[q, n]: the n inverted lists nearest each query, nearest first. Probing a
        large share of the lists, the centroids are scanned whole (an HNSW graph walk
        with efSearch >= n costs more)."""
        quantizer = faiss.downcast_index(self.ivf.quantizer)
        flat = faiss.downcast_index(quantizer.storage) if isinstance(quantizer, faiss.IndexHNSW) \
            else quantizer
        if isinstance(flat, faiss.IndexFlat) and (flat is quantizer or 8 * n >= self.ivf.nlist):
            centroids = RowCodes(flat, flat.metric_type).view().view(np.float32)
            return faiss.knn(x, centroids, n, metric=flat.metric_type)[1]
        if isinstance(quantizer, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(efSearch=max(n, quantizer.hnsw.efSearch))
            return numpy_search(quantizer)(x, n, params=params)[1]
        return numpy_search(quantizer)(x, n)[1]


def numpy_search(index: faiss.Index):
    """FAISS's own search, which takes search parameters. `faiss.contrib.torch_utils`
    (imported by pytorch-metric-learning) replaces Index.search in the whole process with
    a torch-aware one that takes none, keeping the original as `search_numpy`."""
    return getattr(index, "search_numpy", index.search)
