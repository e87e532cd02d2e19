"""The results and errors tables: explicit pyarrow schemas with a version in the metadata."""

from __future__ import annotations

import json

import pyarrow as pa

from models.errors import LakelensError

SCHEMA_VERSION = "1"
VERSION_KEY = b"lakelens.schema_version"


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


BOX = pa.list_(pa.float32(), 4)
RLE = pa.struct([
    _f("size", pa.list_(pa.int32(), 2), "mask height, width in original upright pixels"),
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
       "K x 3 flattened (x, y, visibility), original upright pixels; K and names in file metadata"),
])
MODEL = pa.struct([
    _f("task", pa.string(), "detect, segment, pose or embed"),
    _f("arch", pa.string(), "architecture name"),
    _f("weights", pa.string(), "default:<torchvision enum>, random:seed<N> or sha256:<checkpoint>"),
])
TASK_COLUMNS = {"detect": "detections", "segment": "instances", "pose": "poses",
                "embed": "embedding"}


def results_schema(embedding_dim: int) -> pa.Schema:
    """One row per image. The embedding is fixed_size_list<float32>[embedding_dim]."""
    return pa.schema([
        _f("image_id", pa.string(), "hash of the canonical URI", nullable=False),
        _f("uri", pa.string(), "where the image was read from", nullable=False),
        _f("content_hash", pa.string(), "sha256 of the file's bytes"),
        _f("width", pa.int32(), "upright width in pixels (after EXIF orientation)"),
        _f("height", pa.int32(), "upright height in pixels (after EXIF orientation)"),
        _f("detections", pa.list_(DETECTION), "detect task; null when not asked"),
        _f("instances", pa.list_(INSTANCE), "segment task; null when not asked"),
        _f("poses", pa.list_(POSE), "pose task; null when not asked"),
        _f("embedding", pa.list_(pa.float32(), embedding_dim),
           "embed task: L2-normalised image embedding; null when not asked"),
        _f("models", pa.list_(MODEL), "what made each column"),
        _f("run_id", pa.string(), "the run that wrote the row"),
        _f("annotated_at", pa.timestamp("us", tz="UTC"), "when the row was written"),
    ])


ERRORS_SCHEMA = pa.schema([
    _f("image_id", pa.string(), "hash of the canonical URI", nullable=False),
    _f("uri", pa.string(), "where the image was to be read from", nullable=False),
    _f("stage", pa.string(), "list, read, decode, detect, segment, pose, embed, encode or write"),
    _f("error_type", pa.string(), "short error class, e.g. TruncatedImageError"),
    _f("message", pa.string(), "what went wrong, in one line"),
    _f("run_id", pa.string(), "the run that wrote the row"),
])


def file_metadata(kind: str, run_id: str, extra: dict | None = None) -> dict[bytes, bytes]:
    """Parquet file metadata: schema version, table kind, run id and any extra JSON."""
    meta = {VERSION_KEY: SCHEMA_VERSION.encode(), b"lakelens.table": kind.encode(),
            b"lakelens.run_id": run_id.encode()}
    for key, value in (extra or {}).items():
        meta[f"lakelens.{key}".encode()] = json.dumps(value).encode()
    return meta


def check_version(schema: pa.Schema, where: str) -> None:
    """Raise LakelensError unless the file was written with this schema version."""
    found = (schema.metadata or {}).get(VERSION_KEY)
    if found is None:
        raise LakelensError(f"{where} is not a lakelens table (no {VERSION_KEY.decode()})")
    if found.decode() != SCHEMA_VERSION:
        raise LakelensError(
            f"{where} has schema version {found.decode()}; this lakelens reads {SCHEMA_VERSION}")
