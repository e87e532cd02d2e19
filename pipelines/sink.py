"""The Parquet sink: results and errors tables, written under a temporary name and
renamed into place, so a reader never sees half a file."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from models.registry import ModelInfo
from pipelines.schema import ERRORS_SCHEMA, TASK_COLUMNS, file_metadata, results_schema
from pipelines.sources import is_remote

logger = logging.getLogger(__name__)


def output_fs(out: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a local directory or a URI (s3://, gs://, file://)."""
    if is_remote(out):
        return pafs.FileSystem.from_uri(out)
    return pafs.LocalFileSystem(), os.path.abspath(out.removeprefix("file://"))


def write_atomic(fs: pafs.FileSystem, path: str, write) -> None:
    """Call write(tmp_path), then rename tmp_path to `path`."""
    head, tail = path.rsplit("/", 1)
    tmp = f"{head}/.{tail}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def write_json(fs: pafs.FileSystem, path: str, obj: dict) -> None:
    data = (json.dumps(obj, indent=2, default=str) + "\n").encode()

    def put(tmp: str) -> None:
        with fs.open_output_stream(tmp) as f:
            f.write(data)

    write_atomic(fs, path, put)


def _absolute(spec: str) -> str:
    """A local checkpoint path made absolute, so an index can find the embedder later."""
    if spec in ("default", "random") or is_remote(spec):
        return spec
    return os.path.abspath(spec.removeprefix("file://"))


class AnnotationSink(Datasink):
    """Splits each bundle of rows into result rows and error rows and writes one file of
    each (of at least `rows_per_file` rows, the last excepted)."""

    def __init__(self, out: str, *, run_id: str, models: list[ModelInfo], embedding_dim: int,
                 rows_per_file: int):
        self.out = out
        self.run_id = run_id
        self.models = [{"task": m.task, "arch": m.arch, "weights": m.weights_id} for m in models]
        specs = [{**row, "spec": _absolute(m.weights)}
                 for row, m in zip(self.models, models, strict=True)]
        self.embedding_dim = embedding_dim
        self.rows_per_file = rows_per_file
        pose = next((m for m in models if m.task == "pose"), None)
        labels = {m.task: list(m.labels) for m in models if m.labels}
        self.extra = {"models": specs, "labels": labels,
                      "keypoint_names": list(pose.keypoint_names) if pose else [],
                      "embedding_dim": embedding_dim}
        self.results = 0
        self.errors = 0
        self.files: list[str] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx) -> dict:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"results": 0, "errors": 0, "files": []}
        table = pa.concat_tables(tables, promote_options="default")
        failed = pc.is_valid(table.column("error_stage"))
        results = self.results_table(table.filter(pc.invert(failed)))
        errors = self.errors_table(table.filter(failed))
        fs, root = output_fs(self.out)
        part = f"part-{self.run_id}-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
        files = []
        for kind, t in (("results", results), ("errors", errors)):
            if t.num_rows:
                path = f"{root}/{kind}/{part}"
                write_atomic(fs, path, lambda tmp, t=t: pq.write_table(t, tmp, filesystem=fs))
                files.append(path)
        logger.info("wrote %d result rows and %d error rows", results.num_rows, errors.num_rows)
        return {"results": results.num_rows, "errors": errors.num_rows, "files": files}

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.results += r["results"]
            self.errors += r["errors"]
            self.files += r["files"]

    def results_table(self, t: pa.Table) -> pa.Table:
        schema = results_schema(self.embedding_dim)
        n = t.num_rows
        now = datetime.now(UTC)
        arrays = []
        for field in schema:
            if field.name in t.column_names:
                arrays.append(t.column(field.name).cast(field.type))
            elif field.name == "models":
                arrays.append(pa.array([self.models] * n, type=field.type))
            elif field.name == "run_id":
                arrays.append(pa.array([self.run_id] * n, type=field.type))
            elif field.name == "annotated_at":
                arrays.append(pa.array([now] * n, type=field.type))
            else:  # a task that was not asked
                assert field.name in TASK_COLUMNS.values(), field.name
                arrays.append(pa.nulls(n, type=field.type))
        meta = file_metadata("results", self.run_id, self.extra)
        return pa.Table.from_arrays(arrays, schema=schema.with_metadata(meta))

    def errors_table(self, t: pa.Table) -> pa.Table:
        n = t.num_rows
        arrays = [t.column("image_id"), t.column("uri"), t.column("error_stage"),
                  t.column("error_type"), t.column("error_message"),
                  pa.array([self.run_id] * n, type=pa.string())]
        meta = file_metadata("errors", self.run_id)
        return pa.Table.from_arrays(arrays, schema=ERRORS_SCHEMA.with_metadata(meta))
