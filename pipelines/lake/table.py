"""The annotations table (schema 4): an append-only log and a per-part snapshot.

DIR/log/            Delta, append-only, unpartitioned (TABLE_SCHEMA). A night appends its
                    new and changed images' rows and tombstones, each commit one file sorted
                    by image_id; nothing in it is rewritten by a night.
DIR/current/        Delta, partitioned by `part` (a hex prefix of image_id): one row per
                    live image as of the part's watermark (a log version), rebuilt one part
                    at a time by pipelines.lake.upkeep; each part also holds one `watermark`
                    row (status = 'watermark', committed_in = the watermark).
DIR/table/          a schema 2/3 table, kept as the history before `lakelens migrate`.
DIR/lakelens.json   schema version, initial parts, embedding dim, each task's model spec
DIR/runs/ID.json    one record per run
DIR/_lakelens/      the run lock and per-run staging files (never read by other tools)

The current view of a part = its snapshot rows whose image has no log row after the
watermark, plus, of the images that do, their latest log row unless it is a tombstone.
Readers without lakelens do the same with one floor for every part (README).

Commits are per chunk: a chunk's rows land in one Delta commit or not at all. Every commit
carries two app transactions: `lakelens.run.<run_id>` = chunk sequence number (a commit
retried after an unknown outcome is recognised as done) and `lakelens.lock` = the lock
epoch (a writer whose lock was taken over is fenced off). Taking the lock commits its
epoch at once (LakeTable.fence).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import AddAction, CommitProperties, RemoveAction, Transaction

from models.errors import LakelensError
from pipelines.lake.sources import is_remote
from pipelines.schema import SCHEMA_VERSION, SNAPSHOT_SCHEMA, STATUSES, TABLE_SCHEMA, WATERMARK

logger = logging.getLogger(__name__)

LOG_DIR = "log"
SNAPSHOT_DIR = "current"
LEGACY_DIR = "table"  # schema 2/3
META_FILE = "lakelens.json"
DEFAULT_BUCKETS = 16
FENCE_APP = "lakelens.lock"
PART_APP = "lakelens.part."  # + part name: the log version the part's snapshot reflects
HEX = "0123456789abcdef"
ROW_GROUP = 8192  # rows per Parquet row group: image_id ranges prune reads inside a file
TARGET_FILE_BYTES = 256 * 2**20
WRITER = WriterProperties(max_row_group_size=ROW_GROUP, compression="ZSTD")
LEGACY_VERSIONS = ("2", "3")


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


# -- parts: hex prefixes of image_id ------------------------------------------------------

def initial_parts(buckets: int) -> list[str]:
    """16^k parts for a new table, k the smallest with 16^k >= buckets (1 part for 1)."""
    level = 0
    while 16**level < buckets:
        level += 1
    parts = [""]
    for _ in range(level):
        parts = [p + h for p in parts for h in HEX]
    return parts


def part_bounds(part: str) -> tuple[str, str | None]:
    """[lo, hi) of the image ids in `part` (lo "": from the start, hi None: to the end; ids
    are hex, but any string falls in exactly one part)."""
    lo = "" if not part.strip("0") else part
    head = part.rstrip("f")
    if not head:
        return lo, None
    return lo, head[:-1] + HEX[HEX.index(head[-1]) + 1]


def part_filter(part: str) -> pc.Expression | None:
    lo, hi = part_bounds(part)
    flt = col("image_id") >= lo if lo else None
    if hi is not None:
        upper = col("image_id") < hi
        flt = upper if flt is None else flt & upper
    return flt


def part_index(image_ids: pa.Array | pa.ChunkedArray, parts: list[str]) -> np.ndarray:
    """For each id, the index in (sorted, prefix-free, covering) `parts` of its part."""
    ids = np.asarray(image_ids.to_numpy(zero_copy_only=False), dtype=str)
    return np.maximum(np.searchsorted(np.asarray(parts, dtype=str), ids, side="right") - 1, 0)


def _and(*exprs: pc.Expression | None) -> pc.Expression | None:
    out = None
    for e in exprs:
        if e is not None:
            out = e if out is None else out & e
    return out


def latest_keys(rows: pa.Table) -> pa.Table:
    """(image_id, committed_in) of each image's latest row in `rows`."""
    if not rows.num_rows:
        return pa.table({"image_id": pa.array([], pa.string()), "committed_in": pa.array([], pa.int64())})
    agg = rows.select(["image_id", "committed_in"]).group_by("image_id", use_threads=False).aggregate(
        [("committed_in", "max")])
    return pa.table({"image_id": agg.column("image_id").cast(pa.string()),
                     "committed_in": agg.column("committed_in_max")})


def is_latest(batch: pa.RecordBatch | pa.Table, keys: pa.Table) -> pa.Array:
    """Mask of the rows of `batch` that are their image's latest (per `keys`)."""
    idx = pc.index_in(batch.column("image_id").cast(pa.string()), value_set=keys.column("image_id"))
    want = pc.take(keys.column("committed_in"), idx)
    return pc.fill_null(pc.equal(want, batch.column("committed_in")), False)


def embed_weights(models: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Each row's embed weights id (null when the row names no embedding model), by Arrow
    kernels only: no Python object per row."""
    models = models.combine_chunks() if isinstance(models, pa.ChunkedArray) else models
    flat = pc.list_flatten(models)
    embed = pc.fill_null(pc.equal(pc.struct_field(flat, "task"), "embed"), False)
    parents = pc.list_parent_indices(models).filter(embed).to_numpy()
    at = np.full(len(models), -1, np.int64)
    at[parents] = np.arange(len(parents))
    weights = pc.struct_field(flat, "weights").filter(embed)
    return pc.take(weights, pa.array(at, mask=at < 0)).cast(pa.string())


def _status_filter(status: str | None) -> pc.Expression:
    if status is None:
        return col("status").isin(list(STATUSES))
    return col("status") == status


@dataclass
class LakeTable:
    """An opened annotations table (log + snapshot + lakelens's sidecar)."""

    out: str
    log: DeltaTable
    snap: DeltaTable
    meta: dict
    _cache: dict = field(default_factory=dict, repr=False)  # per (log, snapshot) version

    def _cached(self, key: tuple, make):
        key = (self.log.version(), self.snap.version(), *key)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = make()
        return self._cache[key]

    @property
    def dt(self) -> DeltaTable:
        """The log (its version is the table's version)."""
        return self.log

    @property
    def uri(self) -> str:
        return location(self.out, LOG_DIR)

    @property
    def version(self) -> int:
        return int(self.log.version())

    @property
    def versions(self) -> tuple[int, int]:
        """(log version, snapshot version): open_table(out, at=...) reads exactly this state."""
        return int(self.log.version()), int(self.snap.version())

    @property
    def embedding_dim(self) -> int | None:
        return self.meta.get("embedding_dim")

    def model(self, task: str) -> dict | None:
        """The model spec that last annotated `task` (arch, weights id, spec, labels...)."""
        return self.meta.get("models", {}).get(task)

    def refresh(self) -> None:
        self.log.update_incremental()
        self.snap.update_incremental()

    # -- parts and watermarks --------------------------------------------------------------

    def part_stats(self) -> dict[str, int]:
        """part -> rows in its snapshot files (the watermark row included)."""
        return self._cached(("stats",), self._part_stats)

    def _part_stats(self) -> dict[str, int]:
        actions = pa.table(self.snap.get_add_actions(flatten=True))
        if not actions.num_rows:
            return {}
        parts = actions.column("partition.part").to_pylist()
        counts = actions.column("num_records").to_pylist()
        out: dict[str, int] = {}
        for p, n in zip(parts, counts, strict=True):
            out[p or ""] = out.get(p or "", 0) + int(n or 0)
        return out

    def parts(self) -> list[str]:
        """The snapshot's parts, sorted: every part with files, plus the initial parts no
        split has refined yet."""
        return list(self._cached(("parts",), self._parts))

    def _parts(self) -> list[str]:
        have = set(self.part_stats())
        for p in self.meta.get("parts", [""]):
            if p not in have and not any(h.startswith(p) for h in have):
                have.add(p)
        return sorted(have)

    def watermark(self, part: str) -> int:
        """The log version `part`'s snapshot reflects (-1: none; read the whole log)."""
        def read() -> int:
            v = self.snap.transaction_version(PART_APP + part)
            return -1 if v is None else int(v)

        return self._cached(("mark", part), read)

    def floor(self) -> int:
        """The lowest watermark of any part: log rows after it hold every change since."""
        return min((self.watermark(p) for p in self.parts()), default=-1)

    # -- reading ---------------------------------------------------------------------------

    def log_dataset(self, since: int = -1) -> pds.Dataset:
        """The log's files that can hold rows committed after `since`."""
        if since < 0:
            return self._cached(("log",), self.log.to_pyarrow_dataset)
        return self._cached(("log", since), lambda: self.log.to_pyarrow_dataset(
            file_pruning_predicate=f"committed_in > {since}"))

    def snapshot_dataset(self) -> pds.Dataset:
        return self._cached(("snap",), self.snap.to_pyarrow_dataset)

    def dataset(self) -> pds.Dataset:
        """Every row ever appended to the log (the history since schema 4)."""
        return self.log_dataset()

    def changed_keys(self, part: str, since: int) -> pa.Table:
        """(image_id, committed_in) of the latest log row after `since` of each image in
        `part` that has one."""
        flt = _and(part_filter(part), pc.field("committed_in") > since)
        rows = self.log_dataset(since).to_table(columns=["image_id", "committed_in"], filter=flt)
        return latest_keys(rows)

    def changes(self, part: str, since: int, columns: list[str], *, where: pc.Expression | None = None,
                keys: pa.Table | None = None, batch_rows: int = 16_384) -> Iterator[pa.RecordBatch]:
        """The latest log row after `since` of each image of `part` that has one (tombstones
        included unless `where` excludes them)."""
        keys = self.changed_keys(part, since) if keys is None else keys
        if not keys.num_rows:
            return
        read = list(dict.fromkeys([*columns, "image_id", "committed_in"]))
        flt = _and(part_filter(part), pc.field("committed_in") > since, where)
        scanner = self.log_dataset(since).scanner(columns=read, filter=flt, batch_size=batch_rows,
                                                  batch_readahead=1, fragment_readahead=1)
        for batch in scanner.to_batches():
            if batch.num_rows:
                batch = batch.filter(is_latest(batch, keys))
                if batch.num_rows:
                    yield batch.select(columns)

    def current_part(self, part: str, columns: list[str] | None = None, *, status: str | None = "ok",
                     where: pc.Expression | None = None,
                     batch_rows: int = 16_384) -> Iterator[pa.RecordBatch]:
        """One part's current view: snapshot rows of images unchanged since the watermark,
        then the latest log rows of the images changed since."""
        columns = list(columns or TABLE_SCHEMA.names)
        mark = self.watermark(part)
        keys = self.changed_keys(part, mark)
        flt = _and(pc.field("part") == part, _status_filter(status), where)
        if keys.num_rows:
            flt = flt & pc.invert(col("image_id").isin(keys.column("image_id")))
        scanner = self.snapshot_dataset().scanner(columns=columns, filter=flt, batch_size=batch_rows,
                                                  batch_readahead=1, fragment_readahead=1)
        for batch in scanner.to_batches():
            if batch.num_rows:
                yield batch
        yield from self.changes(part, mark, columns, where=_and(_status_filter(status), where),
                                keys=keys, batch_rows=batch_rows)

    def current(self, columns: list[str] | None = None, *, status: str | None = "ok",
                where: pc.Expression | None = None, batch_rows: int = 16_384) -> Iterator[pa.RecordBatch]:
        """Record batches of the current view (one row per image), streamed part by part:
        no more than one part's changed ids is held."""
        for part in self.parts():
            yield from self.current_part(part, columns, status=status, where=where, batch_rows=batch_rows)

    def current_table(self, columns: list[str] | None = None, *, status: str | None = "ok",
                      where: pc.Expression | None = None) -> pa.Table:
        """The current view as one table: for tests and small lookups only."""
        schema = pa.schema([TABLE_SCHEMA.field(c) for c in columns or TABLE_SCHEMA.names])
        batches = [pa.Table.from_batches([b]).cast(schema) for b in
                   self.current(columns, status=status, where=where)]
        return pa.concat_tables(batches) if batches else schema.empty_table()

    def lookup(self, image_id: str, columns: list[str], *, status: str | None = "ok") -> dict | None:
        """One image's current row, or None. Reads only what can hold it: the latest of its
        log rows after its part's watermark (log files past the watermark, and in each the
        row groups whose image_id range holds it: files are sorted by image_id), else its
        snapshot row (its part's files, the same row-group pruning); never a whole part."""
        parts = self.parts()
        part = parts[int(part_index(pa.array([image_id]), parts)[0])]
        mark = self.watermark(part)
        read = list(dict.fromkeys([*columns, "status"]))
        logged = _rows_of(self.log_dataset(mark), image_id, ["committed_in"], pc.field("committed_in") > mark)
        if logged.num_rows:  # changed since the watermark: its latest log row (ids first, then the row)
            latest = int(pc.max(logged.column("committed_in")).as_py())
            rows = _rows_of(self.log_dataset(mark), image_id, read, pc.field("committed_in") == latest)
        else:
            rows = _rows_of(self.snapshot_dataset(), image_id, read, pc.field("part") == part)
        if not rows.num_rows:
            return None
        row = rows.slice(0, 1).to_pylist()[0]
        if row["status"] != status if status is not None else row["status"] not in STATUSES:
            return None
        return {c: row[c] for c in columns}

    # -- writing ---------------------------------------------------------------------------

    def fence(self, epoch: int, *, run_id: str) -> int:
        """Commit the lock epoch into the log at once (an empty commit), so that an owner
        whose lock was taken over is refused at its next commit. Returns the epoch in
        force: at least one above any the table has seen (a lock file that was reset)."""
        self.log.update_incremental()
        seen = self.log.transaction_version(FENCE_APP)
        if seen is not None and seen >= epoch:
            epoch = int(seen) + 1
        props = CommitProperties(app_transactions=[Transaction(FENCE_APP, epoch)],
                                 custom_metadata={"lakelens.run_id": run_id, "lakelens.fence": str(epoch)},
                                 max_commit_retries=0)
        for attempt in range(STORE_TRIES):
            try:
                write_deltalake(self.log, TABLE_SCHEMA.empty_table(), mode="append", commit_properties=props)
                break
            except OSError as e:  # the store failed (503, a reset): did the commit land anyway?
                self.log.update_incremental()
                if (self.log.transaction_version(FENCE_APP) or -1) >= epoch:
                    break
                _store_retry_or_fail(self.out, "the lock's fence commit", attempt, e)
        self.log.update_incremental()
        return epoch

    def check_fence(self, epoch: int) -> None:
        fence = self.log.transaction_version(FENCE_APP)
        if fence is not None and fence > epoch:
            raise LakelensError(
                f"the lock on {self.out} was taken over by a newer run (lock epoch {fence} > "
                f"{epoch}); this run stops without committing more")

    def commit(self, rows: pa.Table, *, run_id: str, seq: int, epoch: int,
               info: dict | None = None) -> int | None:
        """Append one chunk of rows (TABLE_SCHEMA: results, errors, tombstones) in one
        commit. Returns the new version, or None when this chunk was already committed."""
        for attempt in range(STORE_TRIES):
            try:
                return self._commit_once(rows, run_id=run_id, seq=seq, epoch=epoch, info=info,
                                         retried=attempt > 0)
            except OSError as e:  # the store failed (503, a reset) and the chunk did not land
                _store_retry_or_fail(self.out, f"chunk {seq}", attempt, e)
        raise AssertionError("unreachable")

    def _commit_once(self, rows: pa.Table, *, run_id: str, seq: int, epoch: int, info: dict | None,
                     retried: bool) -> int | None:
        self.log.update_incremental()
        app = f"lakelens.run.{run_id}"
        done = self.log.transaction_version(app)
        if done is not None and done >= seq:  # delta-rs would accept a lower one: checked here
            if retried:  # a try before this one landed; its answer was lost
                return self.version
            logger.info("chunk %d of run %s is already committed", seq, run_id)
            return None
        self.check_fence(epoch)
        if not rows.num_rows:
            return None
        version = self.version + 1
        props = CommitProperties(
            app_transactions=[Transaction(app, seq), Transaction(FENCE_APP, epoch)],
            custom_metadata={"lakelens.run_id": run_id, "lakelens.chunk": str(seq),
                             **{f"lakelens.{k}": str(v) for k, v in (info or {}).items()}},
            max_commit_retries=0)
        rows = _with(rows, "committed_in", pa.array(np.full(rows.num_rows, version), pa.int64()))
        rows = rows.select(TABLE_SCHEMA.names).cast(TABLE_SCHEMA).sort_by("image_id")
        try:
            write_deltalake(self.log, rows, mode="append", commit_properties=props,
                            writer_properties=WRITER, target_file_size=TARGET_FILE_BYTES)
        except Exception:
            self.log.update_incremental()
            done = self.log.transaction_version(app)
            if done is not None and done >= seq:  # the commit landed; its answer was lost
                return self.version
            raise
        self.log.update_incremental()
        return self.version

    def write_part(self, replaces: list[str], rows: pa.Table, *, version: int, children: list[str]) -> None:
        """Replace the snapshot's parts `replaces` by `rows` (SNAPSHOT_SCHEMA, sorted by
        image_id, parts among `children`) plus one watermark row per child, in one commit
        that records every child's watermark (version -1: placeholders, nothing absorbed)."""
        marks = pa.table({"part": pa.array(children, pa.string()),
                          "status": pa.array([WATERMARK] * len(children)),
                          "committed_in": pa.array([version] * len(children), pa.int64())})
        marks = pa.table({f.name: marks.column(f.name) if f.name in marks.column_names
                          else pa.nulls(len(children), f.type) for f in SNAPSHOT_SCHEMA},
                         schema=SNAPSHOT_SCHEMA)
        data = pa.concat_tables([marks, rows.select(SNAPSHOT_SCHEMA.names).cast(SNAPSHOT_SCHEMA)])
        names = sorted(set(replaces) | set(children))
        quoted = ", ".join("'" + p + "'" for p in names)
        txns = [Transaction(PART_APP + c, version) for c in children] if version >= 0 else []
        props = CommitProperties(app_transactions=txns, max_commit_retries=0,
                                 custom_metadata={"lakelens.upkeep": ",".join(replaces)})
        write_deltalake(self.snap, data, mode="overwrite", predicate=f"part IN ({quoted})",
                        partition_by=["part"], commit_properties=props, writer_properties=WRITER,
                        target_file_size=TARGET_FILE_BYTES)
        self.snap.update_incremental()

    def erase(self, ids: pa.Array, *, run_id: str) -> int:
        """Rewrite the log files that hold rows of `ids` (tombstones aside) without those
        rows, in one commit (each new file added, each old one removed); only those files
        are read and written. Written here with pyarrow, not by delta-rs's delete, so the
        files keep plain Arrow strings (delta-io/delta-rs#4579). Returns rows removed."""
        hit = col("image_id").isin(ids) & (col("status") != "tombstone")

        def drop(rows: pa.Table) -> pa.Array:
            return pc.fill_null(pc.and_(pc.is_in(rows.column("image_id"), value_set=ids),
                                        pc.not_equal(rows.column("status"), "tombstone")), False)

        removed = rewrite_without(self.log, self.out, LOG_DIR, self.log_dataset(), TABLE_SCHEMA, hit, drop,
                                  stats=_stats, metadata={"lakelens.run_id": run_id})
        self.log.update_incremental()
        return removed

    def vacuum(self, *, retention_hours: int) -> int:
        """Delete the files no version within `retention_hours` needs (log and snapshot)."""
        removed = 0
        for dt in (self.log, self.snap):
            removed += len(dt.vacuum(retention_hours=retention_hours, dry_run=False,
                                     enforce_retention_duration=False))
            dt.update_incremental()
        return removed


def rewrite_without(dt: DeltaTable, out: str, subdir: str, dataset: pds.Dataset, schema: pa.Schema,
                    hit: pc.Expression, drop, *, stats=None, metadata: dict | None = None) -> int:
    """Rewrite the files of Delta table `dt` (DIR/`subdir`) that hold rows matching `hit`
    without the rows `drop(rows)` marks, in one commit (each new file added, each old one
    removed); only those files are read and written, with pyarrow (not delta-rs's delete,
    which would leave string_view files: delta-io/delta-rs#4579). Returns rows removed."""
    fs, root = output_fs(out)
    now = int(datetime.now(UTC).timestamp() * 1000)
    actions, removed = [], 0
    for fragment in dataset.get_fragments():
        if not fragment.count_rows(filter=hit):
            continue
        rows = fragment.to_table(schema=dataset.schema).cast(schema)
        keep = rows.filter(pc.invert(drop(rows)))
        removed += rows.num_rows - keep.num_rows
        name = f"part-erase-{uuid.uuid4().hex}.zstd.parquet"
        pq.write_table(keep, f"{root}/{subdir}/{name}", filesystem=fs, row_group_size=ROW_GROUP,
                       compression="zstd")
        size = fs.get_file_info(f"{root}/{subdir}/{name}").size
        actions.append(AddAction(name, size, {}, now, True, stats(keep) if stats else None))
        actions.append(RemoveAction(fragment.path, True, now, None, {}))
    if actions:
        props = CommitProperties(custom_metadata={**(metadata or {}), "lakelens.erased": str(removed)})
        dt.create_write_transaction(actions, "append", schema, commit_properties=props)
    return removed


def _rows_of(dataset: pds.Dataset, image_id: str, columns: list[str], where: pc.Expression) -> pa.Table:
    """The rows of one image_id. The predicate names the column itself (no cast), so that
    the scanner skips files and row groups by their image_id statistics; files that carry
    string_view (delta-io/delta-rs#4579) take the cast one, which reads them whole."""
    try:
        return dataset.to_table(columns=columns, filter=where & (pc.field("image_id") == image_id))
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowInvalid):
        return dataset.to_table(columns=columns, filter=where & (col("image_id") == image_id))


def _stats(rows: pa.Table) -> str:
    """Delta file statistics of the columns readers prune by (image_id, committed_in)."""
    def bounds(name: str) -> tuple:
        mm = pc.min_max(rows.column(name))
        return mm["min"].as_py(), mm["max"].as_py()

    lo_id, hi_id = bounds("image_id")
    lo_v, hi_v = bounds("committed_in")
    return json.dumps({"numRecords": rows.num_rows,
                       "minValues": {"image_id": lo_id, "committed_in": lo_v},
                       "maxValues": {"image_id": hi_id, "committed_in": hi_v},
                       "nullCount": {"image_id": rows.column("image_id").null_count,
                                     "committed_in": rows.column("committed_in").null_count}})


def _with(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)


def col(name: str) -> pc.Expression:
    """A filter's reference to a table column. String columns are cast to string: files that
    delta-rs rewrote carry Arrow `string_view`, and pyarrow's scanner cannot compare those
    with a string literal (delta-io/delta-rs#4579)."""
    typ = SNAPSHOT_SCHEMA.field(name).type
    return pc.field(name).cast(typ) if pa.types.is_string(typ) else pc.field(name)


def _root(out: str) -> str:
    if out.rstrip("/").endswith("/" + LOG_DIR) or out.rstrip("/").endswith("/" + LEGACY_DIR):
        return out.rstrip("/").rsplit("/", 1)[0]
    return out


class NeedsMigration(LakelensError):
    """The table is of an older schema: `lakelens migrate DIR` (or the next annotate)."""


def open_table(out: str, *, at: tuple[int, int] | None = None) -> LakeTable:
    """Open DIR's table for reading (at `at` = (log version, snapshot version): what
    LakeTable.versions gave another process). DIR may also be given as DIR/log."""
    out = _root(out)
    fs, root = output_fs(out)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise LakelensError(f"{out!r} does not exist; create a table with "
                            "`lakelens annotate SOURCE --out DIR`")
    meta = read_json(fs, f"{root}/{META_FILE}")
    if meta is None:
        hint = " (it holds loose Parquet files of lakelens < 0.2: re-annotate it)" if _has_loose(
            fs, root) else ""
        raise LakelensError(f"{out!r} holds no lakelens table{hint}; create one with "
                            "`lakelens annotate SOURCE --out DIR`")
    version = str(meta.get("schema_version"))
    if version in LEGACY_VERSIONS:
        raise NeedsMigration(f"{out!r} holds a table of schema {version}; bring it to schema "
                             f"{SCHEMA_VERSION} with `lakelens migrate {out}` (the next annotate "
                             "does it too)")
    if version != SCHEMA_VERSION:
        raise LakelensError(f"{out!r} has table schema version {version}; this lakelens reads "
                            f"{SCHEMA_VERSION} (and migrates {', '.join(LEGACY_VERSIONS)})")
    try:
        log = DeltaTable(location(out, LOG_DIR), version=at[0] if at else None)
        snap = DeltaTable(location(out, SNAPSHOT_DIR), version=at[1] if at else None)
    except TableNotFoundError as e:
        raise LakelensError(f"{out!r} is damaged: {e}") from e
    except OSError as e:
        raise LakelensError(f"cannot open the table in {out!r}: {e}") from e
    return LakeTable(out, log, snap, meta)


def legacy_table(out: str) -> DeltaTable | None:
    """DIR/table of a table migrated from schema 2/3 (its history before), if any."""
    try:
        return DeltaTable(location(out, LEGACY_DIR))
    except (TableNotFoundError, OSError):
        return None


def _has_loose(fs: pafs.FileSystem, root: str) -> bool:
    return fs.get_file_info(f"{root}/results").type == pafs.FileType.Directory


def create_tables(out: str) -> None:
    """DIR/log and DIR/current, empty (existing ones are left as they are)."""
    DeltaTable.create(location(out, LOG_DIR), TABLE_SCHEMA, mode="ignore",
                      name="lakelens_log", description="lakelens annotations: append-only log",
                      configuration={"delta.appendOnly": "false"})
    DeltaTable.create(location(out, SNAPSHOT_DIR), SNAPSHOT_SCHEMA, mode="ignore", partition_by=["part"],
                      name="lakelens_current",
                      description="lakelens annotations: one row per live image, by part")


STORE_TRIES = 4  # a commit the store failed (503 SlowDown, a reset) is tried this often


def _store_retry_or_fail(out: str, what: str, attempt: int, error: OSError) -> None:
    """Wait before the next try of a commit the store failed, or give up in one line."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    if attempt + 1 >= STORE_TRIES:
        raise LakelensError(f"the store failed {STORE_TRIES} times committing {what} to {out}: {first}; "
                            "what was committed stays committed, run again") from error
    delay = 0.5 * 2**attempt
    logger.warning("committing %s to %s failed (%s); trying again in %.1f s", what, out, first, delay)
    time.sleep(delay)


def create_or_open(out: str, *, buckets: int = DEFAULT_BUCKETS) -> LakeTable:
    """Open DIR's table, creating an empty one (and DIR) when there is none. An older
    schema raises NeedsMigration."""
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
            create_tables(out)
        except OSError as e:
            raise LakelensError(f"--out {out} is not writable: {e}") from e
        write_json(fs, f"{root}/{META_FILE}", {"schema_version": SCHEMA_VERSION,
                                               "parts": initial_parts(buckets), "embedding_dim": None,
                                               "models": {}})
    return open_table(out)


def save_meta(table: LakeTable) -> None:
    fs, root = output_fs(table.out)
    write_json(fs, f"{root}/{META_FILE}", table.meta)
