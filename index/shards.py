"""An IVF index built in shards over one trained quantizer, merged into one.

Each shard holds the vectors of a contiguous range of rows: the trained (empty) index is
cloned and the shard's vectors are added under their global row numbers (for a re-rank
index, the base IVF gets the ids, the re-rank codes are kept in row order). Shards are
merged in row order (merge_shard): inverted list by inverted list, the
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
    return isinstance(_base(index), faiss.IndexIVF)


def _base(index: faiss.Index) -> faiss.Index:
    down = faiss.downcast_index(index)
    return faiss.downcast_index(down.base_index) if isinstance(down, faiss.IndexRefine) else down


def shard_template(trained: faiss.Index) -> faiss.Index:
    """What shards add to: a copy of the trained index, except that a fast-scan IVF-PQ
    becomes the plain IVF-PQ with the same quantizer and codebooks (its lists merge
    safely; FAISS 1.15's merge of fast-scan block lists corrupts memory once a list's
    size is not a multiple of the block). finish() turns the merge back into fast-scan."""
    base = _base(trained)
    if not isinstance(base, faiss.IndexIVFPQFastScan):
        return faiss.clone_index(trained)
    quantizer = faiss.clone_index(base.quantizer)
    plain = faiss.IndexIVFPQ(quantizer, base.d, base.nlist, base.pq.M, base.pq.nbits, base.metric_type)
    plain.own_fields = True
    quantizer.this.disown()
    plain.pq, plain.by_residual, plain.is_trained = base.pq, base.by_residual, True
    down = faiss.downcast_index(trained)
    if not isinstance(down, faiss.IndexRefine):
        return plain
    refine = faiss.clone_index(down.refine_index)
    out = faiss.IndexRefine(plain, refine)
    out.own_fields = True
    plain.this.disown()
    refine.this.disown()
    out.k_factor = down.k_factor
    return out


def finish(merged: faiss.Index, trained: faiss.Index) -> faiss.Index:
    """The merged shards in the trained index's own form (fast-scan lists packed again).
    The re-rank codes move over as they are (never copied: they are most of the index)."""
    base, want = _base(merged), _base(trained)
    if not isinstance(want, faiss.IndexIVFPQFastScan) or isinstance(base, faiss.IndexIVFPQFastScan):
        return merged
    fast = faiss.IndexIVFPQFastScan(base, want.bbs)
    quantizer = faiss.clone_index(base.quantizer)  # the copy shares base's; give it its own
    fast.quantizer, fast.own_fields = quantizer, True
    quantizer.this.disown()
    fast.nprobe = want.nprobe
    down = faiss.downcast_index(merged)
    if not isinstance(down, faiss.IndexRefine):
        return fast
    # The plain IVF's lists are freed (fast-scan has its own copy); `merged` stays alive
    # (the fast-scan index still refers to parts of it) and keeps owning the re-rank
    # index, which the new wrapper uses as it is.
    plain = faiss.downcast_index(down.base_index)
    empty = faiss.ArrayInvertedLists(plain.nlist, plain.code_size)
    plain.replace_invlists(empty, True)
    empty.this.disown()  # plain owns it now
    out = faiss.IndexRefine(fast, down.refine_index)
    out.own_fields = False
    out.referenced_objects = [fast, merged]
    out.k_factor = faiss.downcast_index(trained).k_factor
    return out


def merge_shard(merged: faiss.Index, shard: faiss.Index) -> None:
    """Append a shard (built on shard_template, rows after merged's) to `merged`."""
    down, other = faiss.downcast_index(merged), faiss.downcast_index(shard)
    if isinstance(down, faiss.IndexRefine):
        _base(merged).merge_from(_base(shard), 0)
        faiss.downcast_index(down.refine_index).merge_from(faiss.downcast_index(other.refine_index), 0)
        down.ntotal = _base(merged).ntotal
        return
    down.merge_from(other, 0)


def add_rows(index: faiss.Index, x: np.ndarray, start: int) -> None:
    """Add vectors as rows start, start+1, ... (their ids in an IVF index; a re-rank
    index's codes and a flat index's rows are positions, so rows must come in order)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not len(x):
        return
    if index.ntotal != start:
        raise ValueError(f"rows must be added in order: the index holds {index.ntotal}, "
                         f"these start at {start}")
    _add(index, x, start)


def _add(index: faiss.Index, x: np.ndarray, start: int) -> None:
    """x as rows start...: ids in the IVF lists, re-rank and flat codes appended."""
    down = faiss.downcast_index(index)
    ids = np.arange(start, start + len(x), dtype=np.int64)
    if isinstance(down, faiss.IndexRefine):
        _base(index).add_with_ids(x, ids)
        down.refine_index.add(x)
        down.ntotal = down.refine_index.ntotal
    elif isinstance(down, faiss.IndexIVF):
        down.add_with_ids(x, ids)
    else:
        down.add(x)


def add_shard(template: faiss.Index, blocks: Iterable[np.ndarray], start: int, *,
              reserve: int = 0) -> faiss.Index:
    """A copy of `template` (shard_template()) holding `blocks` as rows start, ... (ids
    in its IVF lists; its re-rank codes in row order from 0)."""
    index = faiss.clone_index(template)
    if reserve:
        reserve_codes(index, reserve)
    row = start
    for block in blocks:
        x = np.ascontiguousarray(block, dtype=np.float32)
        if len(x):
            _add(index, x, row)
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
