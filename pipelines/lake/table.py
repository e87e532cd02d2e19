"""The annotations table: one Delta Lake table per output DIR.

DIR/table/          the Delta table (TABLE_SCHEMA, partitioned by `bucket`)
DIR/lakelens.json   schema version, bucket count, embedding dim, each task's model spec
DIR/runs/ID.json    one record per run
DIR/_lakelens/      the run lock and per-run staging files (never read by other tools)

Commits are per chunk: a chunk's result and error rows, and the closing of the rows they
supersede, land in one Delta commit (an append, or a merge when rows are closed) or not
at all. Every commit carries two app transactions: `lakelens.run.<run_id>` = chunk
sequence number (a commit that is retried after an unknown outcome is recognised as
done) and `lakelens.lock` = the lock epoch (a writer whose lock was taken over is
fenced off instead of committing beside the new owner).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import CommitProperties, Transaction

from models.errors import LakelensError
from pipelines.lake.sources import is_remote
from pipelines.schema import SCHEMA_VERSION, TABLE_SCHEMA

logger = logging.getLogger(__name__)

TABLE_DIR = "table"
META_FILE = "lakelens.json"
DEFAULT_BUCKETS = 16
FENCE_APP = "lakelens.lock"
CLOSE_REASONS = ("changed", "retried", "full", "vanished")


def output_fs(out: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a local directory or a URI (s3://, gs://, file://)."""
    if is_remote(out):
        return pafs.FileSystem.from_uri(out)
    return pafs.LocalFileSystem(), os.path.abspath(out.removeprefix("file://"))


def location(out: str, *parts: str) -> str:
    """A path under DIR as deltalake and pyarrow take it: absolute local path or URI."""
    base = out.rstrip("/") if is_remote(out) else os.path.abspath(out.removeprefix("file://"))
    return "/".join([base, *parts])


def save_json(target: str, obj, *, indent: int | None = 2) -> None:
    """A JSON file at a local path or a URI: renamed into place locally, one PUT remotely."""
    if is_remote(target):
        fs, path = pafs.FileSystem.from_uri(target)
        with fs.open_output_stream(path) as f:
            f.write((json.dumps(obj, indent=indent, default=str) + "\n").encode())
        return
    write_json(pafs.LocalFileSystem(), os.path.abspath(target.removeprefix("file://")), obj,
               indent=indent)


def write_json(fs: pafs.FileSystem, path: str, obj, *, indent: int | None = 2) -> None:
    """Write under a temporary name, then rename into place."""
    data = (json.dumps(obj, indent=indent, default=str) + "\n").encode()
    head, tail = path.rsplit("/", 1)
    tmp = f"{head}/.{tail}.{uuid.uuid4().hex[:8]}.tmp"
    fs.create_dir(head, recursive=True)
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


@dataclass
class LakeTable:
    """An opened annotations table (the Delta table plus lakelens's sidecar)."""

    out: str
    dt: DeltaTable
    meta: dict

    @property
    def uri(self) -> str:
        return location(self.out, TABLE_DIR)

    @property
    def buckets(self) -> int:
        return int(self.meta["buckets"])

    @property
    def version(self) -> int:
        return int(self.dt.version())

    @property
    def embedding_dim(self) -> int | None:
        return self.meta.get("embedding_dim")

    def model(self, task: str) -> dict | None:
        """The model spec that last annotated `task` (arch, weights id, spec, labels...)."""
        return self.meta.get("models", {}).get(task)

    def refresh(self) -> None:
        self.dt.update_incremental()

    def dataset(self) -> pds.Dataset:
        return self.dt.to_pyarrow_dataset()

    def current(self, columns: list[str] | None = None, *, status: str | None = "ok",
                where: pc.Expression | None = None, batch_rows: int = 16_384) -> Iterator[pa.RecordBatch]:
        """Record batches of the current view (one row per image), streamed."""
        flt = pc.field("is_current")
        if status is not None:
            flt = flt & (col("status") == status)
        if where is not None:
            flt = flt & where
        dataset = self.dataset()
        # a version 2 table not annotated since the upgrade has no semantic column yet
        missing = [c for c in columns or [] if c not in dataset.schema.names]
        scanner = dataset.scanner(columns=[c for c in columns if c not in missing] if missing
                                  else columns, filter=flt, batch_size=batch_rows,
                                  batch_readahead=1, fragment_readahead=1)
        for batch in scanner.to_batches():
            if batch.num_rows and missing:
                arrays = {name: batch.column(name) for name in batch.schema.names}
                arrays |= {c: pa.nulls(batch.num_rows, TABLE_SCHEMA.field(c).type) for c in missing}
                batch = pa.RecordBatch.from_pydict({c: arrays[c] for c in columns})
            if batch.num_rows:
                yield batch

    def current_table(self, columns: list[str] | None = None, *, status: str | None = "ok",
                      where: pc.Expression | None = None) -> pa.Table:
        batches = list(self.current(columns, status=status, where=where))
        if not batches:
            schema = TABLE_SCHEMA if columns is None else pa.schema(
                [TABLE_SCHEMA.field(c) for c in columns])
            return schema.empty_table()
        return pa.Table.from_batches(batches)

    def commit(self, rows: pa.Table | None, closes: pa.Table | None, *, run_id: str, seq: int,
               epoch: int, info: dict | None = None) -> int | None:
        """Land one chunk: `rows` (TABLE_SCHEMA, is_current) and the closing of the current
        rows named by `closes` (image_id, bucket, reason), in one commit. Returns the new
        version, or None when this chunk was already committed."""
        self.refresh()
        app = f"lakelens.run.{run_id}"
        done = self.dt.transaction_version(app)
        if done is not None and done >= seq:
            logger.info("chunk %d of run %s is already committed", seq, run_id)
            return None
        fence = self.dt.transaction_version(FENCE_APP)
        if fence is not None and fence > epoch:
            raise LakelensError(
                f"the lock on {self.out} was taken over by a newer run (lock epoch {fence} > "
                f"{epoch}); this run stops without committing more")
        version = self.version + 1
        props = CommitProperties(
            app_transactions=[Transaction(app, seq), Transaction(FENCE_APP, epoch)],
            custom_metadata={"lakelens.run_id": run_id, "lakelens.chunk": str(seq),
                             **{f"lakelens.{k}": str(v) for k, v in (info or {}).items()}},
            max_commit_retries=0)
        n = rows.num_rows if rows is not None else 0
        if rows is not None and n:
            rows = _with(rows, "committed_in", pa.array([version] * n, pa.int64())).cast(TABLE_SCHEMA)
        try:
            if closes is None or not closes.num_rows:
                if not n:
                    return None
                write_deltalake(self.dt, rows, mode="append", commit_properties=props)
            else:
                self._merge(rows, closes, run_id=run_id, version=version, props=props)
        except Exception:
            self.refresh()
            done = self.dt.transaction_version(app)
            if done is not None and done >= seq:  # the commit landed; its answer was lost
                return self.version
            raise
        self.refresh()
        return self.version

    def _merge(self, rows: pa.Table | None, closes: pa.Table, *, run_id: str, version: int,
               props: CommitProperties) -> None:
        now = datetime.now(UTC)
        m = closes.num_rows
        stubs = {f.name: pa.nulls(m, f.type) for f in TABLE_SCHEMA}
        stubs.update({"image_id": closes.column("image_id"),
                      "bucket": closes.column("bucket").cast(pa.int32()),
                      "run_id": pa.array([run_id] * m), "annotated_at": pa.array([now] * m,
                                                                                 TABLE_SCHEMA.field("annotated_at").type)})
        stub = pa.table(stubs, schema=TABLE_SCHEMA)
        stub = stub.append_column("_close", closes.column("image_id")).append_column(
            "_reason", closes.column("reason"))
        parts = [stub]
        if rows is not None and rows.num_rows:
            k = rows.num_rows
            parts.insert(0, rows.append_column("_close", pa.nulls(k, pa.string())).append_column(
                "_reason", pa.nulls(k, pa.string())))
        source = pa.concat_tables(parts)
        (self.dt.merge(source, predicate="t.bucket = s.bucket AND t.image_id = s._close AND t.is_current",
                       source_alias="s", target_alias="t", commit_properties=props)
         .when_matched_update({"is_current": "false", "closed_in": str(version),
                               "closed_at": "s.annotated_at", "closed_by": "s.run_id",
                               "close_reason": "s._reason"})
         .when_not_matched_insert_all(predicate="s._close IS NULL", except_cols=["_close", "_reason"])
         .execute())

    def history(self) -> pa.Table:
        """Every row ever committed (current and superseded)."""
        return self.dataset().to_table()

    def compact(self, *, retention_hours: int) -> dict:
        """Rewrite small files into large ones, then delete files no version within
        `retention_hours` needs. Returns what was done."""
        optimized = self.dt.optimize.compact()
        removed = self.dt.vacuum(retention_hours=retention_hours, dry_run=False,
                                 enforce_retention_duration=False)
        self.refresh()
        return {"files_added": optimized.get("numFilesAdded", 0),
                "files_removed": optimized.get("numFilesRemoved", 0),
                "vacuumed": len(removed), "version": self.version}


def _with(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)


def col(name: str) -> pc.Expression:
    """A filter's reference to a table column. String columns are cast to string: files that
    delta-rs rewrote (merge, optimize) carry Arrow `string_view`, and pyarrow's scanner cannot
    compare those with a string literal (delta-io/delta-rs#4579)."""
    typ = TABLE_SCHEMA.field(name).type
    return pc.field(name).cast(typ) if pa.types.is_string(typ) else pc.field(name)


def open_table(out: str) -> LakeTable:
    """Open DIR's table for reading. DIR may also be given as DIR/table."""
    if out.rstrip("/").endswith("/" + TABLE_DIR):
        out = out.rstrip("/")[: -len(TABLE_DIR) - 1]
    fs, root = output_fs(out)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise LakelensError(f"{out!r} does not exist; create a table with "
                            "`lakelens annotate SOURCE --out DIR`")
    meta = read_json(fs, f"{root}/{META_FILE}")
    try:
        dt = DeltaTable(location(out, TABLE_DIR))
    except TableNotFoundError as e:
        hint = " (it holds loose Parquet files of lakelens < 0.2: re-annotate it)" if _has_loose(
            fs, root) else ""
        raise LakelensError(f"{out!r} holds no lakelens table{hint}; create one with "
                            "`lakelens annotate SOURCE --out DIR`") from e
    except OSError as e:
        raise LakelensError(f"cannot open the table in {out!r}: {e}") from e
    if meta is None:
        raise LakelensError(f"{out}/{META_FILE} is missing: {out!r} is not a lakelens table")
    if str(meta.get("schema_version")) not in READABLE_VERSIONS:
        raise LakelensError(f"{out!r} has table schema version {meta.get('schema_version')}; "
                            f"this lakelens reads {SCHEMA_VERSION}")
    return LakeTable(out, dt, meta)


READABLE_VERSIONS = (SCHEMA_VERSION, "2")  # 2 lacks the semantic column: read as null


def _has_loose(fs: pafs.FileSystem, root: str) -> bool:
    return fs.get_file_info(f"{root}/results").type == pafs.FileType.Directory


def create_or_open(out: str, *, buckets: int = DEFAULT_BUCKETS) -> LakeTable:
    """Open DIR's table, creating an empty one (and DIR) when there is none."""
    fs, root = output_fs(out)
    try:
        fs.create_dir(root, recursive=True)
    except OSError as e:
        raise LakelensError(f"--out {out} is not writable: {e}") from e
    if read_json(fs, f"{root}/{META_FILE}") is None:
        if _has_loose(fs, root):
            raise LakelensError(f"--out {out} holds loose Parquet results of an older lakelens; "
                                "choose a new directory")
        try:
            DeltaTable.create(location(out, TABLE_DIR), TABLE_SCHEMA, mode="ignore",
                              partition_by=["bucket"], name="lakelens_annotations",
                              description="lakelens annotations: one current row per image",
                              configuration={"delta.appendOnly": "false"})
        except OSError as e:
            raise LakelensError(f"--out {out} is not writable: {e}") from e
        write_json(fs, f"{root}/{META_FILE}", {"schema_version": SCHEMA_VERSION,
                                               "buckets": buckets, "embedding_dim": None,
                                               "models": {}})
    return open_table(out)


def upgrade(table: LakeTable) -> None:
    """Bring a version 2 table to this schema: add the columns it lacks (one metadata
    commit; old files read them as null). Called by a writer holding the run lock."""
    if str(table.meta.get("schema_version")) == SCHEMA_VERSION:
        return
    from deltalake.schema import Field

    have = set(table.dt.schema().to_arrow().names)
    new = [f for f in TABLE_SCHEMA if f.name not in have]
    if new:
        table.dt.alter.add_columns([Field.from_arrow(f) for f in new])
        logger.info("%s: table schema %s -> %s (added %s)", table.out,
                    table.meta.get("schema_version"), SCHEMA_VERSION, ", ".join(f.name for f in new))
    table.meta["schema_version"] = SCHEMA_VERSION
    save_meta(table)


def save_meta(table: LakeTable) -> None:
    fs, root = output_fs(table.out)
    write_json(fs, f"{root}/{META_FILE}", table.meta)
