"""`lakelens index build`: a new index version from the table's current view.

One process (a small lake, or no Ray): the embeddings are streamed through it part by part;
the id map is written to Parquet as it goes. On Ray (`shards` > 1, or automatically inside
a Ray job on a large lake): tasks count the parts' embeddings, draw the training sample and
the held-out queries, the driver trains the quantizer and codes once (on the GPU where
FAISS sees one), then each shard task adds the vectors of its own parts over that trained
index and returns its IVF shard, its id map and the exact neighbours of the held-out
queries among its rows; the driver merges the shards in row order, one at a time (the
same inverted lists as one process would build), writes each shard's id map as its own
file, tunes and writes the version. Either way the held-out recall gate and tuning are
the same.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import faiss
import numpy as np
import pyarrow.parquet as pq

from index import build as B
from index import versions as V
from index.shards import shardable
from index.source import BATCH_ROWS, vectors_of
from models.errors import LakelensError
from pipelines import version
from pipelines.indexing.reading import Plan, count_parts, id_rows, scan_parts, vectors
from pipelines.indexing.sharded import build_shards, count_shards, sample_shards
from pipelines.lake.table import LakeTable, open_table
from pipelines.schema import SCHEMA_VERSION

logger = logging.getLogger(__name__)

HELD_OUT_QUERIES = 1000
SHARD_MIN_ROWS = 2_000_000  # inside a Ray job, shard the build past this many vectors
SHARD_ROWS = 2_000_000  # rows per shard when sharding automatically


@dataclass(frozen=True)
class IndexBuildConfig:
    results: str
    out: str
    factory: str = "auto"
    metric: str = "ip"
    gpu: str = "auto"
    train_sample: int | None = None  # default: 40 vectors per IVF list, at least 50k
    memory_budget_gb: float = B.DEFAULT_MEMORY_BUDGET / 2**30
    batch_rows: int = BATCH_ROWS
    seed: int = 0
    shards: int | None = None  # None: auto (Ray running and a large lake); 0 or 1: one process

    def __post_init__(self) -> None:
        if self.metric not in B.METRICS:
            raise LakelensError(f"--metric {self.metric!r}: choose from {', '.join(B.METRICS)}")
        if self.gpu not in ("auto", "on", "off"):
            raise LakelensError(f"--gpu {self.gpu!r}: choose from auto, on, off")
        if self.train_sample is not None and self.train_sample < 1:
            raise LakelensError(f"--train-sample must be >= 1, got {self.train_sample}")
        if not self.factory:
            raise LakelensError("--factory is empty; use auto or a FAISS factory string")
        if self.shards is not None and self.shards < 0:
            raise LakelensError(f"--shards must be >= 0, got {self.shards}")


@contextmanager
def index_lock(path: str):
    """INDEX_DIR's writer lock (a second writer is refused with one line naming the first)."""
    from pipelines.lake.lock import acquire

    with acquire(str(path), f"index-{uuid.uuid4().hex[:12]}") as lock:
        yield lock


def build(cfg: IndexBuildConfig, *, keep: int = V.KEEP_VERSIONS) -> dict:
    """Build INDEX_DIR from a results table, under the index's writer lock; returns the
    manifest written (`keep`: index versions left, 1 after an erasure)."""
    with index_lock(cfg.out):
        return build_locked(cfg, keep=keep)


def build_locked(cfg: IndexBuildConfig, *, keep: int = V.KEEP_VERSIONS,
                 trained: faiss.Index | None = None) -> dict:
    """build() for a caller holding the lock. `trained`: an already trained empty index to
    add to instead of training one (tests compare the two ways of building with it)."""
    started = time.perf_counter()
    gpu = B.use_gpu(cfg.gpu)
    table = open_table(cfg.results)
    model = table.model("embed")
    if model is None or not table.embedding_dim:
        raise LakelensError(f"no embeddings in {table.out!r}: run `lakelens annotate --tasks embed` first")
    shards = _shards(cfg, table)
    parts = table.parts()
    if shards > 1:
        counted = count_shards(table, parts, model["weights_id"], shards)
    else:
        counted = count_parts(table, parts, model["weights_id"])
    n, others = sum(c for _, c, _ in counted), sum(o for _, _, o in counted)
    if others:
        raise LakelensError(
            f"{others} of {n} embeddings in {table.out!r} were made by another embedder than "
            f"{model['arch']} ({model['weights_id']}) (a --full run cut short?): run `lakelens annotate` "
            "again with the same models to redo them, then build the index")
    if n == 0:
        raise LakelensError(f"no embeddings in {cfg.results!r} (every row's embedding is null)")
    dim = int(table.embedding_dim)
    if cfg.factory == "auto":
        choice = B.choose_factory(n, dim, memory_budget=int(cfg.memory_budget_gb * 2**30))
    else:
        choice = B.Choice(cfg.factory, "given with --factory")
    index = trained if trained is not None else B.new_index(choice.factory, dim, cfg.metric)
    plan = Plan(table, parts, [c for _, c, _ in counted], dim,
                {"arch": model["arch"], "weights": model["weights_id"], "spec": model["spec"]}, choice, index)
    logger.info("index for %d vectors of dim %d: %s (%s)", n, dim, choice.factory, choice.reason)
    if shards > 1 and not shardable(index):
        logger.info("%s cannot be built in shards; building it in one process", choice.factory)
        shards = 0
    n_queries = min(HELD_OUT_QUERIES, max(1, n // 10))
    n_train = 0 if index.is_trained else min(n - n_queries, cfg.train_sample or B.train_sample_size(index))
    # Held-out queries and the training sample: disjoint rows of one seeded sample. A
    # query's own row never counts as its neighbour (B.ExactNeighbors).
    picks = np.random.default_rng(cfg.seed).permutation(n_queries + n_train)
    queries_at, train_at = np.sort(picks[:n_queries]), np.sort(picks[n_queries:])
    positions = B.sample_positions(n, n_queries + n_train, seed=cfg.seed)
    if shards > 1:
        sampled = sample_shards(plan, positions, shards, cfg.batch_rows)
    else:
        sampled = B.take_rows(vectors(scan_parts(table, parts, cfg.batch_rows), dim), positions)
    queries, query_rows = np.ascontiguousarray(sampled[queries_at]), positions[queries_at]
    held = {"train": sampled[train_at]}
    del sampled
    writer = V.Writer(cfg.out)
    try:
        if shards > 1:
            index, segment, exact, built_on = build_shards(
                plan, cfg.metric, cfg.batch_rows, writer, queries, query_rows, held.pop("train"), gpu, shards)
        else:
            index, segment, exact = _build_here(plan, cfg, writer, queries, query_rows, held, gpu)
            built_on = "gpu" if gpu else "cpu"
        held.clear()
        params, recall = B.tune(index, queries, exact.result(), exclude=query_rows)
        manifest = {
            "factory": choice.factory, "factory_reason": choice.reason,
            "factory_requested": cfg.factory, "dim": dim,
            "metric": cfg.metric, "count": index.ntotal, "vectors": index.ntotal,
            "embedder": plan.embedder, "table": table.uri, "table_version": table.version,
            "table_schema": SCHEMA_VERSION,
            "search_params": params, "recall_at_10": round(recall, 4),
            "recall_queries": int(len(queries)), "train_sample": int(n_train),
            "built_on": built_on, "shards": max(shards, 1),
            "build_s": round(time.perf_counter() - started, 3),
            "built_at": datetime.now(UTC).isoformat(), "lakelens_version": version(),
            "trained_on": int(index.ntotal),
        }
        faiss.write_index(index, str(writer.root / segment.dir / "index.faiss"))
        name = writer.commit(manifest, [segment], None, keep=keep)
    except BaseException:
        writer.abort()
        raise
    finally:
        writer.close()
    return {**manifest, "version": name}


def _shards(cfg: IndexBuildConfig, table: LakeTable) -> int:
    if cfg.shards is not None:
        return cfg.shards
    try:
        import ray
    except ImportError:
        return 0
    if not ray.is_initialized():
        return 0
    rows = sum(table.part_stats().values())
    if rows < SHARD_MIN_ROWS:
        return 0
    return max(2, math.ceil(rows / SHARD_ROWS))


def _build_here(plan: Plan, cfg: IndexBuildConfig, writer: V.Writer, queries: np.ndarray,
                query_rows: np.ndarray, held: dict, gpu: bool):
    """One process: stream every vector once to add it (and once before, to size the
    lists); the id map goes to Parquet as it is read."""
    exact = B.ExactNeighbors(queries, B.RECALL_K, cfg.metric, exclude=query_rows)
    rel, local = writer.new_segment()
    kept: dict = {}
    ids_out = pq.ParquetWriter(local / "ids-00000.parquet", V.IDS_SCHEMA)

    def blocks():
        for b in scan_parts(plan.table, plan.parts, cfg.batch_rows):
            ids_out.write_batch(id_rows(b))
            x = vectors_of(b.column("embedding"), plan.dim)
            exact.add(x)  # exact answers for the queries, from the same pass
            yield x

    try:
        index = B.train_and_add(plan.index, lambda: held.pop("train"), blocks(), gpu=gpu,
                                presize=vectors(scan_parts(plan.table, plan.parts, cfg.batch_rows), plan.dim),
                                reserve=plan.n, on_trained=lambda t: kept.setdefault("trained", t))
    finally:
        ids_out.close()
    faiss.write_index(kept.get("trained") or faiss.clone_index(plan.index), str(local / "trained.faiss"))
    return index, V.Segment(rel, 0, int(index.ntotal), ("ids-00000.parquet",)), exact
