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
        """Nearest live images of each vector (float32[q, dim] or [dim]). `allow`
        (bool per row) keeps only those rows, inside the search: a selective filter still
        returns k hits when k rows pass it. `nprobe` overrides the tuned value."""
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
        if allow is None:  # per query batch nothing here may cost O(rows of the index)
            keep, n_keep = self.live, self._live_count
        else:
            keep = self.live & allow
            n_keep = int(keep.sum())
        fetch = min(k, self.index.ntotal)
        if fetch == 0 or n_keep == 0:
            empty = [np.zeros(0, np.float32) for _ in x]
            return Neighbors(empty, [np.zeros(0, np.int64) for _ in x], [[] for _ in x], [[] for _ in x])
        tuned = dict(self.manifest.get("search_params", {}))
        if nprobe is not None:
            tuned["nprobe"] = int(nprobe)
        ivf = self._ivf
        while True:
            params = self._params if allow is None and nprobe is None else search_parameters(
                self.index, tuned, keep, always=True)
            scores, rows = _numpy_search(self.index)(x, fetch, params=params)
            if allow is None or ivf is None:
                break
            short = ((rows >= 0).sum(axis=1) < min(k, n_keep)).any()
            probed = int(tuned.get("nprobe", ivf.nprobe))
            if not short or probed >= ivf.nlist:
                break
            # a selective filter left too few hits in the probed lists: probe more
            tuned["nprobe"] = min(ivf.nlist, max(1, probed) * 4)
        out_s, out_r = [], []
        for s, r in zip(scores, rows, strict=True):
            ok = (r >= 0)
            ok[ok] &= keep[r[ok]]
            out_s.append(s[ok][:k])
            out_r.append(r[ok][:k])
        ids, uris = self.ids.image_ids, self.ids.uris
        return Neighbors(out_s, out_r, [ids.take(pa.array(r)).to_pylist() for r in out_r],
                         [uris.take(pa.array(r)).to_pylist() for r in out_r])

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


def _numpy_search(index: faiss.Index):
    """FAISS's own search, which takes search parameters. `faiss.contrib.torch_utils`
    (imported by pytorch-metric-learning) replaces Index.search in the whole process with
    a torch-aware one that takes none, keeping the original as `search_numpy`."""
    return getattr(index, "search_numpy", index.search)


def open_index(path: str | Path, *, mmap: bool = False) -> SimilarityIndex:
    """Open INDEX_DIR for searching. Raises LakelensError for a missing or corrupt index."""
    return SimilarityIndex(path, mmap=mmap)


def search_parameters(index: faiss.Index, params: dict, live: np.ndarray, *, always: bool = False):
    """FAISS search parameters that exclude dead (or filtered) rows inside the search (an
    ID selector: k hits come back without fetching k + excluded), or None when every row
    is live (unless `always`: parameters such as nprobe are wanted anyway)."""
    if live.all() and not always:
        return None
    bits = np.packbits(live, bitorder="little")
    sel = faiss.IDSelectorBitmap(len(live), faiss.swig_ptr(bits))
    sel.referenced_objects = [bits]  # the C++ selector holds a raw pointer to the bits
    down = faiss.downcast_index(index)
    if isinstance(down, faiss.IndexRefine):
        base = _ivf_params(faiss.downcast_index(down.base_index), params, sel)
        p = faiss.IndexRefineSearchParameters(sel=sel, base_index_params=base)
        p.k_factor = float(params.get("k_factor", down.k_factor))
        p._keep = (sel, base, live)  # the C++ side holds raw pointers
        return p
    return _ivf_params(down, params, sel)


def _ivf_params(index: faiss.Index, params: dict, sel):
    if isinstance(index, faiss.IndexIVF):
        p = faiss.SearchParametersIVF(sel=sel, nprobe=int(params.get("nprobe", index.nprobe)))
    else:
        p = faiss.SearchParameters(sel=sel)
    p._keep = sel
    return p
