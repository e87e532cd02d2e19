"""`lakelens index build|update` and `lakelens query`: thin wiring over index/."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index import build as B
from index import store
from index.source import BATCH_ROWS, EmbeddingSource, open_source
from models.errors import LakelensError
from pipelines import version

logger = logging.getLogger(__name__)

HELD_OUT_QUERIES = 1000


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

    def __post_init__(self) -> None:
        if self.metric not in B.METRICS:
            raise LakelensError(f"--metric {self.metric!r}: choose from {', '.join(B.METRICS)}")
        if self.gpu not in ("auto", "on", "off"):
            raise LakelensError(f"--gpu {self.gpu!r}: choose from auto, on, off")
        if self.train_sample is not None and self.train_sample < 1:
            raise LakelensError(f"--train-sample must be >= 1, got {self.train_sample}")
        if not self.factory:
            raise LakelensError("--factory is empty; use auto or a FAISS factory string")


def _ids_table(image_ids, uris, hashes, live) -> pa.Table:
    return pa.table({"image_id": image_ids, "uri": uris, "content_hash": hashes, "live": live},
                    schema=store.IDS_SCHEMA)


def build(cfg: IndexBuildConfig) -> dict:
    """Build INDEX_DIR from a results table; returns the manifest written."""
    started = time.perf_counter()
    gpu = B.use_gpu(cfg.gpu)
    src = open_source(cfg.results)
    n = src.count_embeddings()
    if n == 0:
        raise LakelensError(f"no embeddings in {cfg.results!r} (every row's embedding is null)")
    if cfg.factory == "auto":
        choice = B.choose_factory(n, src.dim, memory_budget=int(cfg.memory_budget_gb * 2**30))
    else:
        choice = B.Choice(cfg.factory, "given with --factory")
    logger.info("index for %d vectors of dim %d: %s (%s)", n, src.dim, choice.factory, choice.reason)
    index = B.new_index(choice.factory, src.dim, cfg.metric)
    n_queries = min(HELD_OUT_QUERIES, max(1, n // 10))
    n_train = 0 if index.is_trained else min(n - n_queries, cfg.train_sample or _default_train(index))
    # Held-out queries and the training sample: disjoint rows of one seeded sample.
    picks = np.random.default_rng(cfg.seed).permutation(n_queries + n_train)
    queries_at, train_at = np.sort(picks[:n_queries]), np.sort(picks[n_queries:])
    positions = B.sample_positions(n, n_queries + n_train, seed=cfg.seed)
    queries = B.take_rows(src.vectors(cfg.batch_rows), positions[queries_at])
    meta: dict[str, list] = {"image_id": [], "uri": [], "content_hash": []}

    def blocks():  # keeps the row -> image mapping as compact Arrow chunks
        for rows in src.batches(cfg.batch_rows):
            meta["image_id"].append(rows.image_ids)
            meta["uri"].append(rows.uris)
            meta["content_hash"].append(rows.content_hashes)
            yield rows.vectors

    index = B.train_and_add(
        index, lambda: B.take_rows(src.vectors(cfg.batch_rows), positions[train_at]), blocks(),
        gpu=gpu, presize=src.vectors(cfg.batch_rows))
    truth = B.ground_truth(queries, src.vectors(cfg.batch_rows), B.RECALL_K, cfg.metric)
    params, recall = B.tune(index, queries, truth)
    manifest = {
        "factory": choice.factory, "factory_reason": choice.reason, "dim": src.dim,
        "metric": cfg.metric, "count": index.ntotal, "vectors": index.ntotal,
        "embedder": src.embedder, "sources": [os.path.abspath(cfg.results)],
        "search_params": params, "recall_at_10": round(recall, 4),
        "recall_queries": int(len(queries)), "train_sample": int(n_train),
        "built_on": "gpu" if gpu else "cpu", "build_s": round(time.perf_counter() - started, 3),
        "built_at": datetime.now(UTC).isoformat(), "lakelens_version": version(),
    }
    ids = _ids_table(*(pa.chunked_array(meta[c], pa.string()) for c in meta),
                     pa.array(np.ones(index.ntotal, bool)))
    store.save(cfg.out, index, ids, manifest)
    return manifest


def _default_train(index) -> int:
    ivf = B.ivf_of(index)
    return max(50_000, 40 * ivf.nlist) if ivf is not None else 50_000


def update(index_dir: str, results: str, *, batch_rows: int = BATCH_ROWS) -> dict:
    """Add the images of `results` that the index lacks; a changed image (same image_id,
    new content hash) replaces its old vector. Returns the manifest written."""
    started = time.perf_counter()
    opened = store.open_index(index_dir)
    manifest = opened.manifest
    src: EmbeddingSource = open_source(results)
    if src.dim != opened.dim:
        raise LakelensError(f"{results} has embeddings of dim {src.dim}; the index holds dim {opened.dim}")
    old, new = manifest["embedder"], src.embedder
    if (old["arch"], old["weights"]) != (new["arch"], new["weights"]):
        raise LakelensError(f"{results} was embedded with {new['arch']} ({new['weights']}); the "
                            f"index holds {old['arch']} ({old['weights']}): rebuild instead")
    index = opened.index
    ids = pq.read_table(os.path.join(index_dir, "ids.parquet"))
    image_ids, uris = ids.column("image_id").to_pylist(), ids.column("uri").to_pylist()
    hashes, live = ids.column("content_hash").to_pylist(), ids.column("live").to_pylist()
    row_of = dict(opened.row_of)
    added = replaced = 0
    for rows in src.batches(batch_rows):
        take = []
        batch_ids, batch_uris = rows.image_ids.to_pylist(), rows.uris.to_pylist()
        for j, (iid, h) in enumerate(zip(batch_ids, rows.content_hashes.to_pylist(), strict=True)):
            r = row_of.get(iid)
            if r is not None and hashes[r] == h:
                continue
            if r is not None:
                live[r] = False
                replaced += 1
            row_of[iid] = len(image_ids)
            image_ids.append(iid)
            uris.append(batch_uris[j])
            hashes.append(h)
            live.append(True)
            take.append(j)
        if take:
            index.add(np.ascontiguousarray(rows.vectors[take]))
            added += len(take)
    manifest = {**manifest, "count": int(sum(live)), "vectors": index.ntotal,
                "sources": manifest["sources"] + [os.path.abspath(results)],
                "updated_at": datetime.now(UTC).isoformat(),
                "last_update": {"added": added - replaced, "replaced": replaced,
                                "seconds": round(time.perf_counter() - started, 3)}}
    store.save(index_dir, index, _ids_table(image_ids, uris, hashes, live), manifest)
    return manifest
