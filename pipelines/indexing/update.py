"""`lakelens index update` (and every annotate run's index sync): the table's changes
since the version the index saw, in memory bounded by the night's changes.

The images the log changed since (their latest rows with committed_in > table_version)
are read part by part. Their old rows die: the id map is scanned file by file (image_id
only, in batches) for them, and the version's live bits are cleared. The night's new
vectors are encoded with the index's trained (empty) copy into one new segment; the
segments before it are never read or rewritten. A reader merges the segments in row order
(index.versions). A rebuild replaces all of it when the index has outgrown its type, when
too many rows are dead or segments many, when images were forgotten (their vectors must
leave every file), or when the index predates segments or the table's schema.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index import build as B
from index import versions as V
from index.shards import shardable
from index.source import BATCH_ROWS, vectors_of
from models.errors import LakelensError
from pipelines.indexing.build import IndexBuildConfig, build_locked, index_lock
from pipelines.indexing.reading import id_rows
from pipelines.lake.table import open_table
from pipelines.schema import SCHEMA_VERSION

logger = logging.getLogger(__name__)

MAX_DEAD_FRACTION = 0.3  # more replaced vectors than this: rebuild
IVF_GROWTH = 4.0  # an IVF index trained on n vectors is rebuilt past this many times n
MAX_SEGMENTS = 32  # more nightly segments than this: rebuild (one segment again)


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
    if len(manifest.get("segments", [])) >= MAX_SEGMENTS:
        return f"{len(manifest['segments'])} segments (one per update; >= {MAX_SEGMENTS})"
    return None


def update(index_dir: str, results: str, *, batch_rows: int = BATCH_ROWS) -> dict:
    """Bring INDEX_DIR up to date with DIR's table, under the index's writer lock: add rows
    committed since the table version it saw, retire (as dead rows) vectors whose image
    changed or vanished. Rebuilds when it must. Returns the manifest written."""
    with index_lock(index_dir):
        return _update(index_dir, results, batch_rows=batch_rows)


def _rebuild(index_dir: str, results: str, manifest: dict, reason: str, started: float, *,
             keep: int = V.KEEP_VERSIONS, added: int = 0, replaced: int = 0) -> dict:
    logger.info("rebuilding %s: %s", index_dir, reason)
    table_version = open_table(results).version
    m = build_locked(IndexBuildConfig(results=results, out=index_dir,
                                      factory=manifest.get("factory_requested", "auto"),
                                      metric=manifest["metric"]), keep=keep)
    return {**m, "last_update": {"rebuilt": reason, "added": added or m["count"], "replaced": replaced,
                                 "table_version": table_version,
                                 "seconds": round(time.perf_counter() - started, 3)}}


def _unchanged(manifest: dict, seen: int) -> dict:
    return {**manifest, "last_update": {"added": 0, "replaced": 0, "removed": 0, "seconds": 0.0,
                                        "table_version": seen, "unchanged": True}}


def _update(index_dir: str, results: str, *, batch_rows: int = BATCH_ROWS) -> dict:
    started = time.perf_counter()
    vdir = V.current_dir(index_dir)
    manifest = V.load_manifest(vdir)
    table = open_table(results)
    seen = manifest.get("table_version")
    if seen is None:
        raise LakelensError(f"{index_dir} was not built from a lakelens table; rebuild it with "
                            "`lakelens index build`")
    if manifest.get("table_schema") != SCHEMA_VERSION:  # built before the table's migration
        return _rebuild(index_dir, results, manifest, "the table was migrated to schema " + SCHEMA_VERSION,
                        started)
    if table.embedding_dim != manifest["dim"]:
        raise LakelensError(f"{results} has embeddings of dim {table.embedding_dim}; the index "
                            f"holds dim {manifest['dim']}")
    model = table.model("embed") or {}
    new = {"arch": model.get("arch"), "weights": model.get("weights_id")}
    old = manifest["embedder"]
    if (old["arch"], old["weights"]) != (new["arch"], new["weights"]):
        raise LakelensError(f"{results} was embedded with {new['arch']} ({new['weights']}); the "
                            f"index holds {old['arch']} ({old['weights']}): rebuild instead")
    if table.version == seen:
        return _unchanged(manifest, seen)
    segments = V.segments_of(manifest)
    trained_path = vdir.parent / segments[0].dir / "trained.faiss" if segments else None
    if trained_path is None or not trained_path.exists():
        return _rebuild(index_dir, results, manifest, "it was written by an older lakelens (no segments)",
                        started)
    total = sum(s.rows for s in segments)
    dim = int(manifest["dim"])

    # The night's changes, part by part: the ids that changed are kept (a column of the
    # night), the new rows' vectors and ids go straight into the new segment's files.
    writer = V.Writer(index_dir)
    try:
        seg_dir, changed, added, forgotten = _stream_night(writer, table, seen, dim, batch_rows)
        if forgotten:  # erasure: their vectors leave the files, and no older version keeps them
            writer.abort()
            return _rebuild(index_dir, results, manifest, f"{forgotten} forgotten images' vectors are erased",
                            started, keep=1)
        live = V.read_live(vdir, total)
        closed = _retire(vdir, manifest, changed, live)
        if not added and not closed:  # only empty commits (lock fences) since: nothing to rewrite
            writer.abort()
            return _unchanged(manifest, seen)
        n_live = int(live.sum()) + added
        reason = rebuild_reason({**manifest, "segments": segments + ([None] if added else [])}, n_live,
                                total + added)
        if reason is None and added and not _appendable(trained_path):
            reason = f"{manifest['factory']} cannot take rows in order"
        if reason:
            writer.abort()
            return _rebuild(index_dir, results, manifest, reason, started, added=added, replaced=closed)
        if added:
            segments = [*segments, V.Segment(seg_dir, total, added, (V.FIRST_IDS,))]
            live = np.concatenate([live, np.ones(added, bool)])
        else:
            writer.discard(seg_dir)  # an empty segment is not kept
        keep_keys = {k: v for k, v in manifest.items() if k not in ("segments", "version", "format_version")}
        out = {**keep_keys, "count": int(live.sum()), "vectors": int(len(live)),
               "table_version": table.version, "updated_at": datetime.now(UTC).isoformat(),
               "last_update": {"added": added, "replaced": closed,
                               "seconds": round(time.perf_counter() - started, 3),
                               "table_version": table.version, "from_table_version": seen,
                               "rows_before": total}}
        name = writer.commit(out, segments, live)
    except BaseException:
        writer.abort()
        raise
    finally:
        writer.close()
    return {**out, "version": name, "segments": [s.as_json() for s in segments]}


def _stream_night(writer: V.Writer, table, seen: int, dim: int, batch_rows: int
                  ) -> tuple[str, pa.ChunkedArray | None, int, int]:
    """Read the changes since `seen` part by part, writing the new rows (status ok, with an
    embedding) into a new segment as they come: (its dir, the changed ids, rows written,
    forgotten images). Only the changed ids are kept in memory."""
    import pyarrow.parquet as pq

    rel, local = writer.new_segment()
    changed: list[pa.Array] = []
    added = forgotten = 0
    columns = ["image_id", "uri", "content_hash", "status", "reason", "embedding"]
    ids_out = pq.ParquetWriter(local / V.FIRST_IDS, V.IDS_SCHEMA)
    try:
        with open(local / V.VECTORS, "wb") as vectors_out:
            for part in table.parts():
                for batch in table.changes(part, seen, columns, batch_rows=batch_rows):
                    ids = batch.column("image_id").cast(pa.string())
                    changed.append(ids.take(pa.array(np.arange(len(ids)))))  # its own buffers
                    forgotten += int(pc.sum(pc.equal(batch.column("reason"), "forgotten")).as_py() or 0)
                    batch = batch.filter(pc.and_(pc.equal(batch.column("status"), "ok"),
                                                 pc.is_valid(batch.column("embedding"))))
                    if batch.num_rows:
                        ids_out.write_batch(id_rows(batch))
                        vectors_of(batch.column("embedding"), dim).tofile(vectors_out)
                        added += batch.num_rows
    finally:
        ids_out.close()
    return rel, pa.chunked_array(changed, pa.string()) if changed else None, added, forgotten


def _appendable(trained_path) -> bool:
    """Whether rows can be added to the index in row order (IVF, re-ranked IVF, Flat)."""
    trained = faiss.read_index(str(trained_path))
    return shardable(trained) or isinstance(faiss.downcast_index(trained), faiss.IndexFlat)


def _retire(vdir, manifest: dict, changed: pa.ChunkedArray | None, live: np.ndarray) -> int:
    """Clear the live bit of every row of a changed image (one pass over the id map's
    image_id column, a batch at a time); returns how many live rows died."""
    if changed is None or not len(changed):
        return 0
    value_set = pc.unique(changed.combine_chunks())
    closed = 0
    for first, batch in V.scan_ids(vdir, manifest, ["image_id"]):
        hit = pc.is_in(batch.column(0), value_set=value_set).to_numpy(zero_copy_only=False)
        if hit.any():
            rows = first + np.flatnonzero(hit)
            closed += int(live[rows].sum())
            live[rows] = False
    return closed


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
    with index_lock(index_dir):
        if V.exists(index_dir):
            m = _update(index_dir, results)
            return {"path": index_dir, "summary": describe_update(m), "version": m.get("version")}
        m = build_locked(IndexBuildConfig(results=results, out=index_dir))
    return {"path": index_dir, "summary": f"built, {m['count']} vectors ({m['factory']})",
            "version": m.get("version")}
