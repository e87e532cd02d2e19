"""The index build on Ray: counts, the sample and the shards as tasks over the table's
parts; the merge in the driver, one shard at a time, in row order.

Every task opens the table at the driver's versions (log and snapshot), so all of them
read one state of the current view. A shard's memory is bounded by its own vectors; the
driver holds the merged index (what the service will hold) and one shard being merged.
"""

from __future__ import annotations

import logging
import os
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index import build as B
from index import versions as V
from index.shards import add_shard, finish, merge_shard, shard_template
from index.source import vectors_of
from pipelines.indexing.reading import Plan, count_parts, id_rows, scan_parts, trained_of, vectors
from pipelines.lake.table import open_table

logger = logging.getLogger(__name__)


def _groups(items: list, n: int) -> list[list]:
    """`items` cut into at most n contiguous, non-empty runs of near-equal length."""
    n = max(1, min(n, len(items)))
    bounds = np.linspace(0, len(items), n + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _balanced(counts: list[int], n: int) -> list[tuple[int, int]]:
    """Contiguous part ranges [a, b) with near-equal row counts (at most n, none empty)."""
    total = sum(counts)
    if not total:
        return [(0, len(counts))]
    cum = np.cumsum(counts)
    cuts = sorted({int(np.searchsorted(cum, total * i / n, side="left")) + 1 for i in range(1, n)})
    bounds = [0] + [c for c in cuts if 0 < c < len(counts)] + [len(counts)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _remote(fn, **options):
    import ray

    return ray.remote(**{"num_cpus": 1, "max_retries": 3, **options})(fn)


def _count_task(out: str, at: tuple[int, int], parts: list[str], weights_id: str):
    return count_parts(open_table(out, at=at), parts, weights_id)


def count_shards(table, parts: list[str], weights_id: str, shards: int) -> list[tuple[str, int, int]]:
    import ray

    task = _remote(_count_task)
    refs = [task.remote(table.out, table.versions, g, weights_id) for g in _groups(parts, shards * 2)]
    return [row for rows in ray.get(refs) for row in rows]


def _sample_task(out: str, at: tuple[int, int], parts: list[str], positions: np.ndarray, dim: int,
                 batch_rows: int) -> np.ndarray:
    return B.take_rows(vectors(scan_parts(open_table(out, at=at), parts, batch_rows), dim), positions)


def _ranges(plan: Plan, shards: int) -> list[tuple[list[str], int, int]]:
    """(parts, first row, rows) per shard, in row order."""
    out, start = [], 0
    for a, b in _balanced(plan.counts, shards):
        rows = sum(plan.counts[a:b])
        out.append((plan.parts[a:b], start, rows))
        start += rows
    return out


def sample_shards(plan: Plan, positions: np.ndarray, shards: int, batch_rows: int) -> np.ndarray:
    """The vectors at the sorted global `positions`, read by one task per shard."""
    import ray

    task = _remote(_sample_task)
    refs = []
    for parts, start, rows in _ranges(plan, shards):
        local = positions[(positions >= start) & (positions < start + rows)] - start
        if len(local):
            refs.append(task.remote(plan.table.out, plan.table.versions, parts, local, plan.dim, batch_rows))
    got = [x for x in ray.get(refs) if len(x)]
    return np.concatenate(got) if got else np.zeros((0, plan.dim), np.float32)


def _shard_task(out: str, at: tuple[int, int], parts: list[str], start: int, rows: int,
                trained: np.ndarray, queries: np.ndarray, query_rows: np.ndarray, metric: str,
                dim: int, batch_rows: int, spill: str, name: str):
    """One shard: its vectors added over the trained index (global row ids), its id map,
    and the exact neighbours of the held-out queries among its rows. Where the driver's
    segment directory `spill` is on this node's disk, the shard and its id map are written
    there (never through the object store, whose shared pages would count in both
    processes' memory); elsewhere they travel as the task's result."""
    table = open_table(out, at=at)
    exact = B.ExactNeighbors(queries, B.RECALL_K, metric, exclude=query_rows, start=start)
    ids: list[pa.RecordBatch] = []

    def blocks():
        for b in scan_parts(table, parts, batch_rows):
            ids.append(id_rows(b))
            x = vectors_of(b.column("embedding"), dim)
            exact.add(x)
            yield x

    index = add_shard(faiss.deserialize_index(trained), blocks(), start, reserve=rows)
    if index.ntotal != rows:
        raise RuntimeError(f"shard of parts {parts[0]}..{parts[-1]} read {index.ntotal} rows, "
                           f"expected {rows}: the table changed under the build")
    table_ids = pa.Table.from_batches(ids, schema=V.IDS_SCHEMA)
    ids.clear()
    if os.path.isdir(spill):
        pq.write_table(table_ids, os.path.join(spill, name))
        faiss.write_index(index, os.path.join(spill, f".{name}.faiss"))
        return None, None, exact.partial()
    return faiss.serialize_index(index), table_ids, exact.partial()


def build_shards(plan: Plan, metric: str, batch_rows: int, writer: V.Writer, queries: np.ndarray,
          query_rows: np.ndarray, train: np.ndarray, gpu: bool, shards: int):
    """(merged index, its segment (index file not yet written), exact neighbours, built_on)."""
    import ray

    started = time.perf_counter()
    trained = trained_of(plan.index, train, gpu)
    del train
    rel, local = writer.new_segment()
    faiss.write_index(trained, str(local / "trained.faiss"))
    data = faiss.serialize_index(shard_template(trained))
    blob = ray.put(data)
    q, qr = ray.put(queries), ray.put(query_rows)
    task = _remote(_shard_task)
    ranges = _ranges(plan, shards)
    names = [f"ids-{n:05d}.parquet" for n in range(len(ranges))]
    refs = [task.remote(plan.table.out, plan.table.versions, parts, start, rows, blob, q, qr, metric,
                        plan.dim, batch_rows, str(local), names[n])
            for n, (parts, start, rows) in enumerate(ranges)]
    logger.info("adding %d vectors in %d shards on Ray", plan.n, len(refs))
    exact = B.ExactNeighbors(queries, B.RECALL_K, metric, exclude=query_rows)
    merged = faiss.deserialize_index(data)
    del data
    for n in range(len(refs)):  # in row order: the merged lists are those of one process
        data, ids, partial = ray.get(refs[n])
        refs[n] = None  # the shard leaves the object store once merged
        spilled = local / f".{names[n]}.faiss"
        if data is None:  # written beside the segment by a task on this node
            shard = faiss.read_index(str(spilled))
            spilled.unlink()
        else:
            shard = faiss.deserialize_index(data)
            pq.write_table(ids, local / names[n])
        del data, ids
        merge_shard(merged, shard)
        del shard
        exact.merge([partial])
        logger.info("merged shard %d of %d (%d vectors so far)", n + 1, len(ranges), merged.ntotal)
    merged = finish(merged, trained)
    logger.info("built %d vectors in %d shards in %.1f s", merged.ntotal, len(ranges),
                time.perf_counter() - started)
    return merged, V.Segment(rel, 0, int(merged.ntotal), tuple(names)), exact, (
        "gpu+ray" if gpu else f"ray ({len(ranges)} shards)")
