"""`lakelens index build|update`: index jobs over the lake table's current view.

build streams the embeddings of the current view (at one table version) into a new
index version; update reads the images the log changed since the version the index saw
(their latest rows with committed_in > table_version): their old vectors become dead, and
the new rows with an embedding are added; it rebuilds instead when the index has outgrown
its type (or was built from a schema 3 table), and says why.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from index import build as B
from index import store
from index.source import BATCH_ROWS, COLUMNS, EmbeddingSource, vectors_of
from models.errors import LakelensError
from pipelines import version
from pipelines.lake.table import LakeTable, embed_weights, open_table
from pipelines.schema import SCHEMA_VERSION

logger = logging.getLogger(__name__)

HELD_OUT_QUERIES = 1000
MAX_DEAD_FRACTION = 0.3  # more replaced vectors than this: rebuild
IVF_GROWTH = 4.0  # an IVF index trained on n vectors is rebuilt past this many times n


def table_source(table: LakeTable) -> EmbeddingSource:
    """The current view's embeddings at the table's loaded version (streamed part by part)."""
    model = table.model("embed")
    if model is None or not table.embedding_dim:
        raise LakelensError(f"no embeddings in {table.out!r}: run `lakelens annotate --tasks embed` first")
    flt = pc.field("embedding").is_valid()
    count = others = 0
    for b in table.current(["models"], where=flt, batch_rows=65_536):
        count += b.num_rows
        made_by = embed_weights(b.column("models"))  # null: a row naming no embedder, taken as is
        others += int(pc.sum(pc.not_equal(made_by, model["weights_id"])).as_py() or 0)
    if others:
        raise LakelensError(
            f"{others} of {count} embeddings in {table.out!r} were made by another embedder than "
            f"{model['arch']} ({model['weights_id']}) (a --full run cut short?): run `lakelens annotate` "
            "again with the same models to redo them, then build the index")

    def scan(batch_rows: int):
        yield from table.current(COLUMNS, where=flt, batch_rows=batch_rows)

    embedder = {"arch": model["arch"], "weights": model["weights_id"], "spec": model["spec"]}
    return EmbeddingSource(table.out, int(table.embedding_dim), embedder, count, scan)


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


def build(cfg: IndexBuildConfig, *, keep: int = store.KEEP_VERSIONS) -> dict:
    """Build INDEX_DIR from a results table; returns the manifest written (`keep`: index
    versions left, 1 after an erasure)."""
    started = time.perf_counter()
    gpu = B.use_gpu(cfg.gpu)
    table = open_table(cfg.results)
    src = table_source(table)
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
    n_train = 0 if index.is_trained else min(n - n_queries, cfg.train_sample or B.train_sample_size(index))
    # Held-out queries and the training sample: disjoint rows of one seeded sample, taken
    # in one pass. A query's own row never counts as its neighbour (B.ExactNeighbors).
    picks = np.random.default_rng(cfg.seed).permutation(n_queries + n_train)
    queries_at, train_at = np.sort(picks[:n_queries]), np.sort(picks[n_queries:])
    positions = B.sample_positions(n, n_queries + n_train, seed=cfg.seed)
    sampled = B.take_rows(src.vectors(cfg.batch_rows), positions)
    queries, query_rows = np.ascontiguousarray(sampled[queries_at]), positions[queries_at]
    held = {"train": sampled[train_at]}
    del sampled
    exact = B.ExactNeighbors(queries, B.RECALL_K, cfg.metric, exclude=query_rows)
    meta: dict[str, list] = {"image_id": [], "uri": [], "content_hash": []}

    def blocks():  # keeps the row -> image mapping as compact Arrow chunks
        for rows in src.batches(cfg.batch_rows):
            meta["image_id"].append(rows.image_ids)
            meta["uri"].append(rows.uris)
            meta["content_hash"].append(rows.content_hashes)
            exact.add(rows.vectors)  # exact answers for the queries, from the same pass
            yield rows.vectors

    index = B.train_and_add(index, lambda: held.pop("train"), blocks(), gpu=gpu,
                            presize=src.vectors(cfg.batch_rows), reserve=n)
    held.clear()
    params, recall = B.tune(index, queries, exact.result(), exclude=query_rows)
    manifest = {
        "factory": choice.factory, "factory_reason": choice.reason,
        "factory_requested": cfg.factory, "dim": src.dim,
        "metric": cfg.metric, "count": index.ntotal, "vectors": index.ntotal,
        "embedder": src.embedder, "table": table.uri, "table_version": table.version,
        "table_schema": SCHEMA_VERSION,
        "search_params": params, "recall_at_10": round(recall, 4),
        "recall_queries": int(len(queries)), "train_sample": int(n_train),
        "built_on": "gpu" if gpu else "cpu", "build_s": round(time.perf_counter() - started, 3),
        "built_at": datetime.now(UTC).isoformat(), "lakelens_version": version(),
        "trained_on": int(index.ntotal),
    }
    ids = _ids_table(*(pa.chunked_array(meta[c], pa.string()) for c in meta),
                     pa.array(np.ones(index.ntotal, bool)))
    saved = store.save(cfg.out, index, ids, manifest, keep=keep)
    return {**manifest, "version": saved}


def rebuild_reason(manifest: dict, live: int, total: int) -> str | None:
    """Why an index that now holds `total` vectors, `live` of them live, should be rebuilt."""
    dead = total - live
    if total and dead / total > MAX_DEAD_FRACTION:
        return f"{dead} of {total} vectors are replaced ones (> {MAX_DEAD_FRACTION:.0%})"
    if manifest.get("factory_requested") == "auto" and manifest["factory"] == "Flat" and \
            live > B.FLAT_MAX_ROWS:
        return f"{live} vectors outgrew Flat (> {B.FLAT_MAX_ROWS})"
    trained = manifest.get("trained_on") or manifest["count"]
    if manifest["factory"].startswith("IVF") and live > IVF_GROWTH * max(trained, 1):
        return f"{live} vectors: more than {IVF_GROWTH:g}x the {trained} its lists were trained for"
    return None


def update(index_dir: str, results: str, *, batch_rows: int = BATCH_ROWS) -> dict:
    """Bring INDEX_DIR up to date with DIR's table: add rows committed since the table
    version it saw, drop (as dead rows) vectors whose image changed or vanished. Rebuilds
    when the index outgrew its type. Returns the manifest written."""
    started = time.perf_counter()
    opened = store.open_index(index_dir)
    manifest = opened.manifest
    table = open_table(results)
    seen = manifest.get("table_version")
    if seen is None:
        raise LakelensError(f"{index_dir} was not built from a lakelens table; rebuild it with "
                            "`lakelens index build`")
    if manifest.get("table_schema") != SCHEMA_VERSION:  # built before the table's migration
        logger.info("rebuilding %s: it was built from a schema %s table", index_dir,
                    manifest.get("table_schema", "3"))
        m = build(IndexBuildConfig(results=results, out=index_dir,
                                   factory=manifest.get("factory_requested", "auto"),
                                   metric=manifest["metric"]))
        return {**m, "last_update": {"rebuilt": "the table was migrated to schema " + SCHEMA_VERSION,
                                     "added": m["count"], "replaced": 0, "table_version": table.version,
                                     "seconds": round(time.perf_counter() - started, 3)}}
    if table.embedding_dim != opened.dim:
        raise LakelensError(f"{results} has embeddings of dim {table.embedding_dim}; the index "
                            f"holds dim {opened.dim}")
    model = table.model("embed") or {}
    new = {"arch": model.get("arch"), "weights": model.get("weights_id")}
    old = manifest["embedder"]
    if (old["arch"], old["weights"]) != (new["arch"], new["weights"]):
        raise LakelensError(f"{results} was embedded with {new['arch']} ({new['weights']}); the "
                            f"index holds {old['arch']} ({old['weights']}): rebuild instead")
    if table.version == seen:
        return {**manifest, "last_update": {"added": 0, "replaced": 0, "removed": 0,
                                            "seconds": 0.0, "table_version": seen,
                                            "unchanged": True}}
    index = opened.index
    ids = pq.read_table(os.path.join(opened.path, "ids.parquet"))
    image_ids, uris = ids.column("image_id").to_pylist(), ids.column("uri").to_pylist()
    hashes = ids.column("content_hash").to_pylist()
    live = opened.live.copy().tolist()
    row_of = {iid: r for r, iid in enumerate(image_ids) if live[r]}
    closed = added = replaced = forgotten = 0
    dim = int(table.embedding_dim or opened.dim)
    columns = ["image_id", "uri", "content_hash", "status", "reason", "embedding"]
    for part in table.parts():  # the images changed since `seen`, one part at a time
        for batch in table.changes(part, seen, columns, batch_rows=batch_rows):
            for iid, why in zip(batch.column("image_id").to_pylist(), batch.column("reason").to_pylist(),
                                strict=True):
                r = row_of.pop(iid, None)
                if r is not None:
                    live[r] = False
                    closed += 1
                    forgotten += why == "forgotten"
            keep = pc.and_(pc.equal(batch.column("status"), "ok"), pc.is_valid(batch.column("embedding")))
            batch = batch.filter(keep)
            if not batch.num_rows:
                continue
            for iid, uri, h in zip(batch.column("image_id").to_pylist(), batch.column("uri").to_pylist(),
                                   batch.column("content_hash").to_pylist(), strict=True):
                row_of[iid] = len(image_ids)
                image_ids.append(iid)
                uris.append(uri)
                hashes.append(h)
                live.append(True)
            index.add(vectors_of(batch.column("embedding"), dim))
            added += batch.num_rows
    if not added and not closed:  # only empty commits (lock fences) since: nothing to rewrite
        return {**manifest, "last_update": {"added": 0, "replaced": 0, "removed": 0, "seconds": 0.0,
                                            "table_version": seen, "unchanged": True}}
    n_live = int(sum(live))
    reason = rebuild_reason(manifest, n_live, index.ntotal)
    if forgotten:  # erasure: their vectors leave the file, and no older version keeps them
        reason = f"{forgotten} forgotten images' vectors are erased"
    if reason:
        logger.info("rebuilding %s: %s", index_dir, reason)
        m = build(IndexBuildConfig(results=results, out=index_dir,
                                   factory=manifest.get("factory_requested", "auto"),
                                   metric=manifest["metric"]), keep=1 if forgotten else store.KEEP_VERSIONS)
        return {**m, "last_update": {"rebuilt": reason, "added": added, "replaced": closed,
                                     "seconds": round(time.perf_counter() - started, 3),
                                     "table_version": table.version}}
    manifest = {**manifest, "count": n_live, "vectors": index.ntotal,
                "table_version": table.version, "updated_at": datetime.now(UTC).isoformat(),
                "last_update": {"added": added, "replaced": closed + replaced,
                                "seconds": round(time.perf_counter() - started, 3),
                                "table_version": table.version, "from_table_version": seen}}
    saved = store.save(index_dir, index, _ids_table(image_ids, uris, hashes, live), manifest)
    return {**manifest, "version": saved}


def describe_update(m: dict) -> str:
    up = m["last_update"]
    if up.get("unchanged"):
        return f"already at table version {up['table_version']}; nothing to do"
    text = (f"{up['added']} vectors added, {up['replaced']} replaced or removed, {m['count']} "
            f"images in the index (table version {up['table_version']}, {up['seconds']:.1f} s)")
    if up.get("rebuilt"):
        text += f"; rebuilt as {m['factory']} because {up['rebuilt']}"
    return text


def sync(index_dir: str, results: str) -> dict:
    """annotate --index: update INDEX_DIR, or build it when there is none yet."""
    if store.exists(index_dir):
        m = update(index_dir, results)
        return {"path": index_dir, "summary": describe_update(m), "version": m.get("version")}
    m = build(IndexBuildConfig(results=results, out=index_dir))
    return {"path": index_dir, "summary": f"built, {m['count']} vectors ({m['factory']})",
            "version": m.get("version")}
