"""The commit loop: pipeline rows -> table rows, a chunk at a time, one Delta commit each.

The driver is the only writer. It holds at most one chunk of rows, turns them into
TABLE_SCHEMA rows (results and errors alike) and appends them to the log in one commit:
a row supersedes the image's earlier ones by being later (nothing is rewritten). A chunk
is committed when it holds chunk_size images, CHUNK_BYTES of rows, or CHUNK_SECONDS
after the previous commit, so a large night writes large files and a crash loses at
most one chunk of work (never a row: the rerun's diff finds what did not land). A run's
first chunk is committed at FIRST_CHUNK_ROWS images: its first results are in the table
(and safe from a crash) within seconds of the first batch, for one small file a run.
Counts for the run summary are kept as it goes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from models.registry import ModelInfo
from pipelines.lake.table import LakeTable
from pipelines.schema import TABLE_SCHEMA, TASK_COLUMNS

logger = logging.getLogger(__name__)

CHUNK_BYTES = 128 * 2**20  # rows held before a commit: one large file per commit
CHUNK_SECONDS = 300.0  # at most this long between commits while rows come in
FIRST_CHUNK_ROWS = 8  # a run's first commit: one batch of the default size
RETRYABLE_STAGES = {"read", "crash", "detect", "segment", "pose", "semantic", "embed"}
PERMANENT_READ_ERRORS = {"FileNotFoundError", "IsADirectoryError", "NotADirectoryError",
                         "FileTooLargeError"}  # over --max-image-mb: until the file changes


def process_age() -> float:
    """Seconds since this process was started (the command's start, imports included)."""
    import psutil  # Ray's own dependency

    return time.time() - psutil.Process().create_time()


def retryable(stage: str | None, error_type: str | None, message: str | None) -> bool | None:
    """Transient errors are tried again by the next run; permanent ones (the bytes cannot
    be decoded, the file is missing) only once the object's fingerprint changes."""
    if stage is None:
        return None
    if stage == "read":
        if error_type in PERMANENT_READ_ERRORS:
            return False
        return True
    return stage in RETRYABLE_STAGES


@dataclass
class Committer:
    table: LakeTable
    run_id: str
    epoch: int
    models: list[ModelInfo]
    chunk_size: int
    seq: int = 0
    annotated: int = 0
    errors: int = 0
    read_retries: int = 0
    error_kinds: Counter = field(default_factory=Counter)  # (stage, error_type) -> n
    decode_nodes: Counter = field(default_factory=Counter)  # node (raylet pid) -> images decoded
    arrivals: Counter = field(default_factory=Counter)  # whole seconds since start -> rows out
    _pending: list[pa.Table] = field(default_factory=list)
    _pending_rows: int = 0
    _pending_bytes: int = 0
    _started: float = field(default_factory=time.perf_counter)
    timeline: dict[str, float] = field(default_factory=dict)  # phase -> seconds since the process began
    _last_commit: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        by_task = {m.task: m for m in self.models}
        self._models_value = [{"task": t, "arch": by_task[t].arch, "weights": by_task[t].weights_id}
                              for t in TASK_COLUMNS if t in by_task]

    def add(self, batch: pa.Table) -> None:
        """Rows out of the pipeline; commits whenever a chunk is full."""
        if not batch.num_rows:
            return
        self.arrivals[int(time.perf_counter() - self._started)] += batch.num_rows
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self._pending_bytes += batch.nbytes
        while self._pending_rows >= (size := self.chunk_size if self.seq else
                                     min(self.chunk_size, FIRST_CHUNK_ROWS)):
            table = pa.concat_tables(self._pending, promote_options="default")
            self._commit(table.slice(0, size))
            rest = table.slice(size)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
            self._pending_bytes = rest.nbytes
        if self._pending_rows and (self._pending_bytes >= CHUNK_BYTES
                                   or time.perf_counter() - self._last_commit >= CHUNK_SECONDS):
            self.flush()

    def flush(self) -> None:
        if self._pending_rows:
            self._commit(pa.concat_tables(self._pending, promote_options="default"))
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0

    def add_crashed(self, todo: pa.Table, message: str) -> None:
        """Images whose worker died every time they were tried: error rows. A first crash
        may be the machine's (a node lost under it) and is tried again by the next run; an
        image that crashes again on that retry waits for its bytes to change (each try
        kills several workers, and a run of nothing but retried crashes would fail)."""
        n = todo.num_rows
        cols = {c: todo.column(c) for c in todo.column_names}
        again = (pc.fill_null(pc.equal(todo.column("kind"), "retry"), False) if "kind" in cols
                 else pa.array([False] * n))
        cols.update({"kind": pa.array(["crashed"] * n), "error_stage": pa.array(["crash"] * n),
                     "error_type": pa.array(["WorkerCrashed"] * n), "error_message": pa.array([message] * n),
                     "crash_retryable": pc.invert(again)})
        self.add(pa.table(cols))

    def close_vanished(self, gone: pa.Table, chunk: int = 100_000) -> int:
        """--prune: a tombstone for each image no longer listed (image_id, uri, fingerprint)."""
        for start in range(0, gone.num_rows, chunk):
            part = gone.slice(start, chunk)
            n = part.num_rows
            cols = {"image_id": part.column("image_id"), "uri": part.column("uri"),
                    "fingerprint": part.column("fingerprint"), "status": pa.array(["tombstone"] * n),
                    "reason": pa.array(["vanished"] * n), "run_id": pa.array([self.run_id] * n),
                    "annotated_at": pa.array([datetime.now(UTC)] * n,
                                             TABLE_SCHEMA.field("annotated_at").type)}
            rows = pa.table({f.name: cols[f.name] if f.name in cols else pa.nulls(n, f.type)
                             for f in TABLE_SCHEMA}, schema=TABLE_SCHEMA)
            self.seq += 1
            self.table.commit(rows, run_id=self.run_id, seq=self.seq, epoch=self.epoch, info={"vanished": n})
        return gone.num_rows

    def _commit(self, batch: pa.Table) -> None:
        batch = _first_per_id(batch)
        rows = self._table_rows(batch)
        ok = int(pc.sum(pc.equal(rows.column("status"), "ok")).as_py() or 0)
        self.seq += 1
        version = self.table.commit(rows, run_id=self.run_id, seq=self.seq, epoch=self.epoch,
                                    info={"rows": rows.num_rows, "ok": ok})
        self._last_commit = time.perf_counter()
        self.mark("first_commit", once=True)
        self.mark("last_commit")
        failed = rows.filter(pc.equal(rows.column("status"), "error"))
        self.error_kinds.update(zip(failed.column("error_stage").to_pylist(),
                                    failed.column("error_type").to_pylist(), strict=True))
        self.annotated += ok
        self.errors += rows.num_rows - ok
        if "decoded_on" in batch.column_names:
            self.decode_nodes.update(batch.column("decoded_on").to_pylist())
        if "read_retries" in batch.column_names:
            self.read_retries += int(pc.sum(batch.column("read_retries")).as_py() or 0)
        done = self.annotated + self.errors
        rate = done / max(time.perf_counter() - self._started, 1e-9)
        logger.info("committed chunk %d (table version %s): %d images so far (%d ok, %d errors), "
                    "%.1f images/s", self.seq, version, done, self.annotated, self.errors, rate)

    def _table_rows(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        stage = batch.column("error_stage")
        status = pc.if_else(pc.is_valid(stage), "error", "ok")
        names = batch.column_names
        retry = [retryable(s, t, m) for s, t, m in zip(
            stage.to_pylist(), batch.column("error_type").to_pylist(),
            batch.column("error_message").to_pylist(), strict=True)]
        now = datetime.now(UTC)
        cols = {}
        for f in TABLE_SCHEMA:
            if f.name == "status":
                cols[f.name] = status
            elif f.name == "error_retryable":
                cols[f.name] = pa.array(retry, pa.bool_())
                if "crash_retryable" in names:  # a crash retried and crashed again: permanent
                    cols[f.name] = pc.coalesce(batch.column("crash_retryable"), cols[f.name])
            elif f.name == "models":
                cols[f.name] = pa.array([self._models_value] * n, f.type)
            elif f.name == "run_id":
                cols[f.name] = pa.array([self.run_id] * n, f.type)
            elif f.name == "annotated_at":
                cols[f.name] = pa.array([now] * n, f.type)
            elif f.name == "reason":
                cols[f.name] = (batch.column("kind").cast(pa.string()) if "kind" in names
                                else pa.array(["new"] * n, pa.string()))
            elif f.name in names:
                cols[f.name] = batch.column(f.name).cast(f.type)
            else:
                cols[f.name] = pa.nulls(n, f.type)
        return pa.table(cols, schema=TABLE_SCHEMA)

    def throughput(self) -> dict:
        """Seconds to the first row out and the steady rate: rows per second between the
        10th and 90th percentile of the rows (by the second they came out)."""
        if not self.arrivals:
            return {"first_row_s": None, "steady_images_per_s": None}
        return {"first_row_s": min(self.arrivals),
                "steady_images_per_s": steady_rate(self.arrivals)}

    def mark(self, phase: str, *, once: bool = False) -> None:
        """Note when `phase` was reached, in seconds since this process began (the run
        record's `timeline_s`: where a run's first seconds went)."""
        if not (once and phase in self.timeline):
            self.timeline[phase] = round(process_age(), 2)

    def top_errors(self, n: int = 3) -> str:
        return ", ".join(f"{stage}/{etype} x{count}"
                         for (stage, etype), count in self.error_kinds.most_common(n))


def steady_rate(bins: dict[float, int]) -> float | None:
    """Rows per second between the 10th and the 90th percentile row, from a histogram of
    when rows were done (bin start in seconds -> rows); None when they share one bin."""
    total = sum(bins.values())
    cum, lo, hi = 0, None, None
    for start in sorted(bins):
        cum += bins[start]
        if lo is None and cum >= 0.1 * total:
            lo = (start, cum)
        if hi is None and cum >= 0.9 * total:
            hi = (start, cum)
    if not total or hi[0] <= lo[0]:
        return None
    return round((hi[1] - lo[1]) / (hi[0] - lo[0]), 3)


def _first_per_id(batch: pa.Table) -> pa.Table:
    """A chunk never holds an image twice (defence in depth: the diff already ensures it)."""
    ids = batch.column("image_id")
    if pc.count_distinct(ids).as_py() == batch.num_rows:
        return batch
    seen: set[str] = set()
    keep = []
    for i in ids.to_pylist():
        keep.append(i not in seen)
        seen.add(i)
    logger.warning("dropped %d duplicate rows from a chunk", len(keep) - sum(keep))
    return batch.filter(pa.array(keep))

