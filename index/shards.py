"""An IVF index built in shards over one trained quantizer, merged into one.

Each shard holds the vectors of a contiguous range of rows: the trained (empty) index is
cloned and the shard's vectors are added under their global row numbers (for a re-rank
index, the base IVF gets the ids, the re-rank codes are kept in row order). Shards are
merged in row order (index.versions.append_segment): inverted list by inverted list, the
result is the index one process would have built adding every row in order with the same
quantizer, list contents included. No Ray here: pipelines.indexing runs the shards as tasks.
"""

from __future__ import annotations

from collections.abc import Iterable

import faiss
import numpy as np

from index.build import ivf_of, reserve_codes


def shardable(index: faiss.Index) -> bool:
    """Whether `index` can be built in shards: an IVF index, alone or under a re-rank."""
    down = faiss.downcast_index(index)
    if isinstance(down, faiss.IndexRefine):
        down = faiss.downcast_index(down.base_index)
    return isinstance(down, faiss.IndexIVF)


def add_shard(trained: faiss.Index, blocks: Iterable[np.ndarray], start: int, *,
              reserve: int = 0) -> faiss.Index:
    """A copy of the trained index holding `blocks` (rows start, start+1, ...)."""
    index = faiss.clone_index(trained)
    down = faiss.downcast_index(index)
    refine = down if isinstance(down, faiss.IndexRefine) else None
    ivf = faiss.downcast_index(refine.base_index) if refine is not None else down
    if reserve:
        reserve_codes(index, reserve)
    row = start
    for block in blocks:
        x = np.ascontiguousarray(block, dtype=np.float32)
        if not len(x):
            continue
        ivf.add_with_ids(x, np.arange(row, row + len(x), dtype=np.int64))
        if refine is not None:
            refine.refine_index.add(x)
            refine.ntotal = refine.refine_index.ntotal
        row += len(x)
    return index


def list_contents(index: faiss.Index) -> list[np.ndarray]:
    """Per inverted list, the ids it holds in order (for comparing two builds)."""
    ivf = ivf_of(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    out = []
    for no in range(ivf.nlist):
        n = lists.list_size(no)
        out.append(faiss.rev_swig_ptr(lists.get_ids(no), n).copy() if n else np.zeros(0, np.int64))
    return out
