"""Searching the index: one opened version, its id map and live rows.

The layout on disk (segments, versions, CURRENT), writing and reading it, are in
index.versions; a reader opens the version CURRENT names, its segments merged into one
FAISS index in row order, and never sees a mix of versions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from index.build import ivf_of, reconstruct, set_search_params
from index.filtered import FilteredSearch, bitmap
from index.filtered import numpy_search as _numpy_search
from index.idmap import IdMap

# The on-disk layout and its writers live in index.versions; these names are the store's API.
from index.versions import (
    FORMAT_VERSION,
    IDS_SCHEMA,
    KEEP_VERSIONS,
    Writer,
    cache_root,
    current_dir,
    current_name,
    exists,
    is_remote,
    load_manifest,
    materialize,
    read_ids,
    read_index,
    read_live,
    save,
)
from models.errors import LakelensError

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "IDS_SCHEMA", "KEEP_VERSIONS", "Neighbors", "SimilarityIndex", "Writer",
           "cache_root", "current_dir", "current_name", "exists", "is_remote", "load_manifest", "materialize",
           "open_index", "save", "search_parameters"]


@dataclass(frozen=True)
class Neighbors:
    """Per query, ranked: scores (inner product, or squared L2 distance), rows, ids, uris."""

    scores: list[np.ndarray]
    rows: list[np.ndarray]
    image_ids: list[list[str]]
    uris: list[list[str]]

    def as_json(self) -> list[list[dict]]:
        return [[{"rank": r + 1, "score": float(s), "image_id": i, "uri": u}
                 for r, (s, i, u) in enumerate(zip(sc, ids, uris, strict=True))]
                for sc, ids, uris in zip(self.scores, self.image_ids, self.uris, strict=True)]


class SimilarityIndex:
    """An index opened from disk: search by vectors, image files or image ids. The index
    file is memory-mapped where FAISS can (IVF inverted lists); the id map stays Arrow."""

    def __init__(self, path: str | Path, *, mmap: bool = False):
        self.root = path if is_remote(path) else Path(path)
        self.path = current_dir(path)
        self.manifest = load_manifest(self.path)
        try:
            self.index, self.mmapped = read_index(self.path, self.manifest, mmap=mmap)
            ids = read_ids(self.path, self.manifest, ["image_id", "uri"])
            live = read_live(self.path, ids.num_rows)
        except (RuntimeError, OSError, pa.ArrowInvalid, ValueError) as e:
            first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            raise LakelensError(f"index {str(self.path)!r} is corrupt or incomplete: {first}") from e
        if ids.num_rows != self.index.ntotal:
            raise LakelensError(f"index {str(self.path)!r} is inconsistent: {self.index.ntotal} "
                                f"vectors but {ids.num_rows} id rows")
        self.live = live
        self.ids = IdMap(ids.column("image_id"), ids.column("uri"), self.live)
        self._live_count = int(self.live.sum())
        self._ivf = ivf_of(self.index)
        set_search_params(self.index, self.manifest.get("search_params", {}))
        self._params = search_parameters(self.index, self.manifest.get("search_params", {}),
                                         self.live)
        self._filtered = FilteredSearch(self.index)

    def live_count(self) -> int:
        return self._live_count

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return self.live_count()

    def row(self, image_id: str) -> int | None:
        """The live row of image_id, or None."""
        return self.ids.row(image_id)

    def live_image_ids(self) -> list[str]:
        return self.ids.image_ids.filter(pa.array(self.live)).to_pylist()

    def uri(self, row: int) -> str:
        return self.ids.uris[row].as_py()

    def search(self, vectors: np.ndarray, k: int = 10, *, allow: np.ndarray | None = None,
               nprobe: int | None = None) -> Neighbors:
        """Nearest live images of each vector (float32[q, dim] or [dim]).

        `allow` keeps only some rows, inside the search: None (every live row), a bool mask
        of one entry per row (len == ntotal), or the allowed row numbers (int, sorted,
        unique; a posting list, which costs what it holds rather than what the index holds).
        Dead rows stay excluded either way; every hit returned is an allowed live row, and a
        filter keeping fewer than k such rows returns exactly those. A selective filter is
        answered from the allowed rows' own stored codes (see index/filtered.py), so its
        recall holds as the filter narrows. `nprobe` overrides the tuned value (for a
        filtered search: the unfiltered value the filter's selectivity scales up)."""
        if k <= 0:
            raise LakelensError(f"k must be >= 1, got {k}")
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise LakelensError(f"query vectors have shape {tuple(np.shape(vectors))}; this "
                                f"index holds dim {self.dim}")
        if not np.isfinite(x).all():
            raise LakelensError("query vectors hold NaN or infinite values")
        x = np.ascontiguousarray(x)
        fetch = min(k, self.index.ntotal)
        rows = None if allow is None else self.allowed_rows(allow)
        mask = allow if rows is not None and np.asarray(allow).dtype == np.bool_ else None
        if fetch == 0 or self._live_count == 0 or (rows is not None and len(rows) == 0):
            empty = [np.zeros(0, np.float32) for _ in x]
            return Neighbors(empty, [np.zeros(0, np.int64) for _ in x], [[] for _ in x], [[] for _ in x])
        if rows is None:  # per query batch nothing here may cost O(rows of the index)
            params = self._params
            if nprobe is not None:
                tuned = {**self.manifest.get("search_params", {}), "nprobe": int(nprobe)}
                params = search_parameters(self.index, tuned, self.live, always=True)
            scores, found = _numpy_search(self.index)(x, fetch, params=params)
            member = self.live
        else:
            scores, found = self._search_filtered(x, fetch, rows, nprobe, mask)
            member = None
        out_s, out_r = [], []
        for s, r in zip(scores, found, strict=True):
            ok = (r >= 0)
            if member is not None:
                ok[ok] &= member[r[ok]]
            else:  # exactly the allowed live rows, whatever the plan returned
                at = np.minimum(np.searchsorted(rows, r), len(rows) - 1)
                ok &= rows[at] == r
            out_s.append(s[ok][:k])
            out_r.append(r[ok][:k])
        ids, uris = self.ids.image_ids, self.ids.uris
        return Neighbors(out_s, out_r, [ids.take(pa.array(r)).to_pylist() for r in out_r],
                         [uris.take(pa.array(r)).to_pylist() for r in out_r])

    def allowed_rows(self, allow: np.ndarray) -> np.ndarray:
        """The live rows `allow` keeps (int64, sorted): from a bool mask of ntotal entries,
        or from sorted unique row numbers. A LakelensError names a malformed filter."""
        a = np.asarray(allow)
        total = self.index.ntotal
        if a.dtype == np.bool_:
            if a.shape != (total,):
                raise LakelensError(f"allow mask has shape {a.shape}; this index has {total} rows "
                                    "(pass a bool per row, or the allowed row numbers)")
            return np.flatnonzero(a & self.live)
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
            raise LakelensError(f"allow must be a bool mask of {total} rows or a 1-d array of "
                                f"row numbers, got {a.dtype} of shape {a.shape}")
        a = a.astype(np.int64, copy=False)
        if a.size and (a[0] < 0 or a[-1] >= total or not (a[1:] > a[:-1]).all()):
            raise LakelensError(f"allow rows must be sorted, unique row numbers in 0..{total - 1}")
        return a[self.live[a]] if self._live_count < total else a

    def _search_filtered(self, x: np.ndarray, fetch: int, rows: np.ndarray, nprobe: int | None,
                         mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the `fetch` nearest of `rows` (allowed, live) per query, by
        the plan FilteredSearch picks; rows past the hits found are -1. mask: the caller's
        bool mask, if it gave one (its bitmap costs less than one made from rows)."""
        tuned = dict(self.manifest.get("search_params", {}))
        if nprobe is not None:
            tuned["nprobe"] = int(nprobe)
        ivf = self._ivf
        plan = self._filtered.plan(len(rows), tuned.get("nprobe", ivf.nprobe if ivf else None))
        logger.debug("filtered search: %d allowed rows, %s plan", len(rows), plan)
        if plan.kind == "exact":
            return self._filtered.search_exact(x, fetch, rows)
        if plan.kind == "lists":
            return self._filtered.search_lists(x, fetch, rows, plan.nprobe)
        bits = (np.packbits(np.asarray(mask) & self.live, bitorder="little") if mask is not None
                else bitmap(rows, self.index.ntotal))
        if plan.nprobe is not None:
            tuned["nprobe"] = plan.nprobe
        refine = faiss.downcast_index(self.index)
        if isinstance(refine, faiss.IndexRefine):
            tuned["k_factor"] = float(tuned.get("k_factor", refine.k_factor)) * plan.shortlist
        while True:
            params = _selector_parameters(self.index, tuned, bits, self.index.ntotal)
            scores, found = _numpy_search(self.index)(x, fetch, params=params)
            if ivf is None:
                return scores, found
            short = ((found >= 0).sum(axis=1) < min(fetch, len(rows))).any()
            probed = int(tuned.get("nprobe", ivf.nprobe))
            if not short or probed >= ivf.nlist:
                return scores, found
            # a selective filter left too few hits in the probed lists: probe more
            tuned["nprobe"] = min(ivf.nlist, max(1, probed) * 4)

    def rows_of_ids(self, image_ids: list[str]) -> np.ndarray:
        """Live rows of image_ids; a LakelensError names the first that is not indexed."""
        rows = self.ids.rows_of(pa.array(image_ids, pa.string()))
        missing = [image_ids[i] for i in np.flatnonzero(rows < 0)]
        if missing:
            raise LakelensError(f"image_id {missing[0]!r} is not in this index"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return rows

    def vectors_of(self, image_ids: list[str]) -> np.ndarray:
        return reconstruct(self.index, self.rows_of_ids(image_ids))

    def search_ids(self, image_ids: list[str], k: int = 10, **kw) -> Neighbors:
        """Neighbours of images already in the index, by image_id."""
        return self.search(self.vectors_of(image_ids), k, **kw)

    def search_images(self, paths: list[str], k: int = 10, *, weights: str | None = None,
                      max_image_mb: float | None = None) -> Neighbors:
        """Neighbours of image files, embedded with the index's own embedder; a file over
        `max_image_mb` MiB (None: models.decode.DEFAULT_MAX_IMAGE_MB) is refused unread
        (LakelensError)."""
        from index.embed import embed_files

        return self.search(embed_files(paths, self.manifest["embedder"], weights=weights,
                                       max_image_mb=max_image_mb), k)


def open_index(path: str | Path, *, mmap: bool = False) -> SimilarityIndex:
    """Open INDEX_DIR for searching. Raises LakelensError for a missing or corrupt index."""
    return SimilarityIndex(path, mmap=mmap)


def search_parameters(index: faiss.Index, params: dict, live: np.ndarray, *, always: bool = False):
    """FAISS search parameters that exclude dead (or filtered) rows inside the search (an
    ID selector: k hits come back without fetching k + excluded), or None when every row
    is live (unless `always`: parameters such as nprobe are wanted anyway)."""
    if live.all() and not always:
        return None
    return _selector_parameters(index, params, np.packbits(live, bitorder="little"), len(live))


def _selector_parameters(index: faiss.Index, params: dict, bits: np.ndarray, n: int):
    sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
    sel.referenced_objects = [bits]  # the C++ selector holds a raw pointer to the bits
    down = faiss.downcast_index(index)
    if isinstance(down, faiss.IndexRefine):
        base = _ivf_params(faiss.downcast_index(down.base_index), params, sel)
        p = faiss.IndexRefineSearchParameters(sel=sel, base_index_params=base)
        p.k_factor = float(params.get("k_factor", down.k_factor))
        p._keep = (sel, base, bits)  # the C++ side holds raw pointers
        return p
    return _ivf_params(down, params, sel)


def _ivf_params(index: faiss.Index, params: dict, sel):
    if isinstance(index, faiss.IndexIVF):
        nprobe = int(params.get("nprobe", index.nprobe))
        p = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        quantizer = faiss.downcast_index(index.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):  # the graph walk must reach nprobe lists
            ef = max(int(params.get("quantizer_efSearch", quantizer.hnsw.efSearch)), 2 * nprobe)
            p.quantizer_params = q = faiss.SearchParametersHNSW(efSearch=ef)
            p._keep = (sel, q)
            return p
    else:
        p = faiss.SearchParameters(sel=sel)
    p._keep = sel
    return p
