"""The annotations table: one explicit pyarrow schema, versioned.

The log holds results, errors and tombstones (a `status` column) so that a chunk's rows
land in one commit or not at all; nothing in it is rewritten by a night. Every listed
image has exactly one row in the current view (pipelines.lake.table).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "4"  # 4: append-only log + per-part snapshot (2, 3: one SCD2 table, migrated in place)


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


BOX = pa.list_(pa.float32())
RLE = pa.struct([
    _f("size", pa.list_(pa.int32()), "mask height, width in original upright pixels"),
    _f("counts", pa.string(), "COCO compressed RLE counts (pycocotools)"),
])
DETECTION = pa.struct([
    _f("box", BOX, "x0, y0, x1, y1 in original upright pixels"),
    _f("label", pa.int32(), "class id (index into the model's label names)"),
    _f("label_name", pa.string(), "class name"),
    _f("score", pa.float32(), "confidence in [0, 1]"),
])
INSTANCE = pa.struct(list(DETECTION) + [_f("mask", RLE, "instance mask as COCO RLE")])
POSE = pa.struct([
    _f("box", BOX, "x0, y0, x1, y1 in original upright pixels"),
    _f("score", pa.float32(), "person confidence in [0, 1]"),
    _f("keypoints", pa.list_(pa.float32()),
       "K x 3 flattened (x, y, visibility), original upright pixels; K and names in DIR/lakelens.json"),
])
SEMANTIC = pa.struct([
    _f("label", pa.int32(), "class id (index into the model's labels; the background is not stored)"),
    _f("label_name", pa.string(), "class name"),
    _f("mask", RLE, "the class's pixels as COCO RLE, original upright resolution"),
    _f("area", pa.int64(), "pixels of the class in the original image"),
    _f("mean_score", pa.float32(), "mean softmax probability over the class's pixels"),
])
MODEL = pa.struct([
    _f("task", pa.string(), "detect, segment, pose, semantic or embed"),
    _f("arch", pa.string(), "architecture name"),
    _f("weights", pa.string(), "default:<torchvision enum>, random:seed<N> or sha256:<checkpoint>"),
])
TASK_COLUMNS = {"detect": "detections", "segment": "instances", "pose": "poses",
                "semantic": "semantic", "embed": "embedding"}
TASK_TYPES = {"detections": pa.list_(DETECTION), "instances": pa.list_(INSTANCE),
              "poses": pa.list_(POSE), "semantic": pa.list_(SEMANTIC),
              "embedding": pa.list_(pa.float32())}
STATUSES = ("ok", "error")  # a current row's status
WATERMARK = "watermark"  # the status of a snapshot part's one bookkeeping row
REASONS = ("new", "changed", "retry", "full", "stale", "crashed", "vanished", "forgotten", "migrated")

# Schema 4: the log (DIR/log) is append-only; a night appends new and changed images'
# rows and tombstones. The snapshot (DIR/current) holds one row per live image, rebuilt
# one part at a time (pipelines.lake.upkeep); the current view = snapshot minus images
# with log rows since the part's watermark, plus their latest such rows.
TABLE_SCHEMA = pa.schema([
    _f("image_id", pa.string(), "sha256 of the canonical URI, 32 hex digits"),
    _f("uri", pa.string(), "where the image was read from (null on a forgotten image's tombstone)"),
    _f("content_hash", pa.string(), "sha256 of the file's bytes (null if unreadable)"),
    _f("size", pa.int64(), "object size in bytes when listed"),
    _f("fingerprint", pa.string(),
       "cheap change detector: size:mtime_ns locally, etag:<ETag> or size:mtime on object stores"),
    _f("status", pa.string(), "ok (a result), error, or tombstone (the image is gone)"),
    _f("error_stage", pa.string(),
       "list, read, decode, detect, segment, pose, semantic, embed, encode or crash"),
    _f("error_type", pa.string(), "short error class, e.g. TruncatedImageError, WorkerCrashed"),
    _f("error_message", pa.string(), "what went wrong, in one line"),
    _f("error_retryable", pa.bool_(), "transient (retried next run) or permanent (until the bytes change)"),
    _f("width", pa.int32(), "upright width in pixels (after EXIF orientation)"),
    _f("height", pa.int32(), "upright height in pixels (after EXIF orientation)"),
    *[_f(col, TASK_TYPES[col], f"{task} task; null when not asked or on error")
      for task, col in TASK_COLUMNS.items()],
    _f("models", pa.list_(MODEL), "what made each task column"),
    _f("run_id", pa.string(), "the run that wrote the row"),
    _f("annotated_at", pa.timestamp("us", tz="UTC"), "when the row was written"),
    _f("committed_in", pa.int64(), "log version of the commit that wrote the row (the latest wins)"),
    _f("reason", pa.string(), "why the row was written: " + ", ".join(REASONS)),
])
SNAPSHOT_SCHEMA = pa.schema([*TABLE_SCHEMA, _f(
    "part", pa.string(), "the snapshot's partition: image ids starting with this hex prefix")])

# Schema 3 (DIR/table, one table with SCD2 history): read by `lakelens migrate` and kept
# as the history before the migration.
LEGACY_COLUMNS = ("bucket", "is_current", "closed_in", "closed_at", "closed_by", "close_reason")
