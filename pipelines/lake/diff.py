"""Listing and the diff against the table, as Ray tasks with bounded memory.

1. Listing: directories (spread over tasks by pipelines.lake.sources.plan_sources),
   manifests (read by Ray Data) and globs become listing rows in Ray tasks. Each task
   writes its rows, keyed by image_id, into per-bucket staging files
   (STAGING/listing/b=K/*.parquet) and returns only counts.
2. Diff: one task per bucket reads that bucket's listing files and that partition of the
   table's current view (the table is partitioned by the same bucket), joins them on
   image_id and writes what to annotate (STAGING/todo/K.parquet) and what vanished.

No process ever holds more than one bucket of the lake, and the driver holds counts only.
A listing task that Ray retries writes its files again under new names: the diff drops
duplicate image ids, so a retry cannot list an image twice.
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines.lake import sources as S
from pipelines.lake.table import col, output_fs

logger = logging.getLogger(__name__)

TODO_SCHEMA = pa.schema([("image_id", pa.string()), ("bucket", pa.int32()), ("uri", pa.string()),
                         ("size", pa.int64()), ("fingerprint", pa.string()), ("kind", pa.string())])
KINDS = ("new", "changed", "retry", "full")  # what to annotate; the rest: unchanged, vanished
GLOB_BATCH = 50_000
TODO_GROUP = 256  # images per block entering the annotate pipeline (and lost with a dead task)
MAX_BLOCKS = 100_000


@dataclass(frozen=True)
class DiffCounts:
    listed: int = 0  # distinct images listed
    new: int = 0
    changed: int = 0
    retry: int = 0  # error rows of earlier runs tried again (transient errors)
    full: int = 0  # unchanged images re-annotated because of --full
    unchanged: int = 0
    vanished: int = 0  # current rows whose image was not listed
    skipped: dict[str, int] = field(default_factory=dict)  # non-image files by extension

    @property
    def todo(self) -> int:
        return self.new + self.changed + self.retry + self.full


LIST_CPUS = 0.5  # listing and staging wait on the store (LIST calls, small writes) more than they compute


def listing_dataset(plan: S.SourcePlan, staging: str) -> ray.data.Dataset:
    """Every listed object as a row of pipelines.lake.sources.LISTING_SCHEMA."""
    parts: list[ray.data.Dataset] = []
    if plan.dirs:
        items = [{"root": i.root, "recursive": i.recursive, "start": i.start, "end": i.end}
                 for i in plan.dirs]
        parts.append(ray.data.from_items(items, override_num_blocks=min(len(items), 256))
                     .map_batches(_list_dirs, batch_size=1, batch_format="pyarrow",
                                  num_cpus=LIST_CPUS))
    for path in plan.text_manifests:
        base = path.rsplit("/", 1)[0]
        parts.append(ray.data.read_text(path).map_batches(
            _text_rows, batch_format="pyarrow", fn_kwargs={"base": base}, num_cpus=LIST_CPUS))
    parquet = plan.parquet_manifests + _expand_globs(plan.globs, staging)
    for path in parquet:
        base = path.rsplit("/", 1)[0]
        parts.append(ray.data.read_parquet(path).map_batches(
            _parquet_rows, batch_format="pyarrow", batch_size=S.LIST_BATCH,
            fn_kwargs={"base": base}, num_cpus=LIST_CPUS))
    if plan.files:
        parts.append(ray.data.from_items([{"uri": f} for f in plan.files]).map_batches(
            _file_rows, batch_format="pyarrow", num_cpus=LIST_CPUS))
    ds = parts[0]
    return ds.union(*parts[1:]) if len(parts) > 1 else ds


def _list_dirs(batch: pa.Table):
    for root, recursive, start, end in zip(*(batch.column(c).to_pylist() for c in (
            "root", "recursive", "start", "end")), strict=True):
        yield from S.list_dir(root, recursive, start, end)


def _text_rows(batch: pa.Table, *, base: str) -> pa.Table:
    return S.text_manifest_rows(batch.column("text").to_pylist(), base)


def _parquet_rows(batch: pa.Table, *, base: str) -> pa.Table:
    return S.parquet_manifest_rows(batch, base)


def _file_rows(batch: pa.Table) -> pa.Table:
    return S.stat_uris(batch.column("uri").to_pylist())


def _expand_globs(globs: list[str], staging: str) -> list[str]:
    """Glob matches streamed into staging Parquet manifests (GLOB_BATCH paths per file),
    with an is_image column: unlike a manifest's entries, a glob's non-images are skipped."""
    from models.errors import LakelensError

    out = []
    fs, root = output_fs(staging)
    fs.create_dir(f"{root}/globs", recursive=True)
    for pattern in globs:
        batch: list[str] = []
        n = 0

        def flush(batch: list[str]) -> None:
            path = f"{root}/globs/{uuid.uuid4().hex}.parquet"
            pq.write_table(pa.table({"uri": batch, "is_image": [S.is_image_name(u) for u in batch]}),
                           path, filesystem=fs)
            out.append(path)

        for match in globlib.iglob(pattern, recursive=True):
            n += 1
            batch.append(S.canonical(match))
            if len(batch) >= GLOB_BATCH:
                flush(batch)
                batch = []
        if not n:
            raise LakelensError(f"SOURCE {pattern!r}: no files match this glob")
        if batch:
            flush(batch)
    return out


# -- staging the listing by bucket --------------------------------------------------------

def stage_listing(ds: ray.data.Dataset, staging: str, buckets: int) -> dict[str, int]:
    """Write the listing into per-bucket staging files; returns non-images by extension."""
    skipped: Counter = Counter()
    stats = ds.map_batches(_stage_batch, batch_format="pyarrow", batch_size=S.LIST_BATCH,
                           fn_kwargs={"staging": staging, "buckets": buckets}, num_cpus=LIST_CPUS)
    for row in stats.iter_rows():
        skipped.update(json.loads(row["skipped"]))
    return dict(skipped)


def _stage_batch(batch: pa.Table, *, staging: str, buckets: int) -> pa.Table:
    glob_rows = batch.column("is_image")
    images = batch.filter(glob_rows)
    others = batch.filter(pc.invert(glob_rows))
    skipped = Counter(S.extension(u) for u in others.column("uri").to_pylist())
    uris = images.column("uri").to_pylist()
    ids = [S.image_id(u) for u in uris]
    bucket = np.fromiter((S.bucket_of(i, buckets) for i in ids), dtype=np.int32, count=len(ids))
    fps = [S.fingerprint(s, m, e) for s, m, e in zip(
        images.column("size").to_pylist(), images.column("mtime_ns").to_pylist(),
        images.column("etag").to_pylist(), strict=True)]
    table = pa.table({"image_id": pa.array(ids, pa.string()), "bucket": pa.array(bucket),
                      "uri": images.column("uri"), "size": images.column("size"),
                      "fingerprint": pa.array(fps, pa.string())})
    fs, root = output_fs(staging)
    order = np.argsort(bucket, kind="stable")
    table, sorted_b = table.take(pa.array(order)), bucket[order]
    starts = np.flatnonzero(np.r_[True, sorted_b[1:] != sorted_b[:-1]]) if len(order) else []
    name = uuid.uuid4().hex
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(order)
        b = int(sorted_b[start])
        fs.create_dir(f"{root}/listing/b={b}", recursive=True)
        pq.write_table(table.slice(start, end - start), f"{root}/listing/b={b}/{name}.parquet",
                       filesystem=fs)
    return pa.table({"listed": [table.num_rows], "skipped": [json.dumps(skipped)]})


# -- the diff -------------------------------------------------------------------------------

def diff(table_uri: str, version: int, staging: str, buckets: int, *, full: bool,
         prune: bool) -> DiffCounts:
    """Classify every listed image against the table's current view at `version`."""
    tasks = ray.data.from_items([{"bucket": b} for b in range(buckets)],
                                override_num_blocks=buckets)
    out = tasks.map_batches(_diff_bucket, batch_size=1, batch_format="pyarrow", fn_kwargs={
        "table_uri": table_uri, "version": version, "staging": staging, "full": full,
        "prune": prune})
    totals: Counter = Counter()
    for row in out.iter_rows():
        totals.update(json.loads(row["counts"]))
    return DiffCounts(**{k: int(totals.get(k, 0)) for k in (
        "listed", "new", "changed", "retry", "full", "unchanged", "vanished")})


def read_bucket_files(staging: str, sub: str) -> pa.Table | None:
    fs, root = output_fs(staging)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{sub}", allow_not_found=True))
    files = sorted(i.path for i in infos if i.path.endswith(".parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])


def current_rows(table_uri: str, bucket: int, columns: list[str], *, version: int | None = None,
                 where: pc.Expression | None = None) -> pa.Table:
    """One partition of the table's current view."""
    from deltalake import DeltaTable

    dt = DeltaTable(table_uri, version=version)
    flt = pc.field("is_current") if where is None else pc.field("is_current") & where
    return dt.to_pyarrow_dataset(partitions=[("bucket", "=", str(bucket))]).to_table(
        columns=columns, filter=flt)


def _diff_bucket(batch: pa.Table, *, table_uri: str, version: int, staging: str, full: bool,
                 prune: bool) -> pa.Table:
    b = int(batch.column("bucket")[0].as_py())
    listed = read_bucket_files(staging, f"listing/b={b}")
    if listed is None:
        listed = pa.schema([f for f in TODO_SCHEMA if f.name != "kind"]).empty_table()
    if pc.count_distinct(listed.column("image_id")).as_py() != listed.num_rows:
        listed = _first_per_id(listed)
    current = current_rows(table_uri, b, ["image_id", "fingerprint", "status", "error_retryable"],
                           version=version)
    current = current.rename_columns(["image_id", "t_fingerprint", "t_status", "t_retryable"])
    joined = listed.join(current, keys="image_id", join_type="full outer", use_threads=False)
    in_list = pc.is_valid(joined.column("uri"))
    in_table = pc.is_valid(joined.column("t_status"))
    fp, t_fp = joined.column("fingerprint"), joined.column("t_fingerprint")
    same = pc.or_(pc.fill_null(pc.equal(fp, t_fp), False), pc.and_(pc.is_null(fp), pc.is_null(t_fp)))
    retryable = pc.and_(pc.fill_null(joined.column("t_retryable"), False),
                        pc.equal(joined.column("t_status"), "error"))
    both = pc.and_(in_list, in_table)
    kinds = {
        "new": pc.and_(in_list, pc.invert(in_table)),
        "changed": pc.and_(both, pc.invert(same)),
        "retry": pc.and_(pc.and_(both, same), pc.fill_null(retryable, False)),
    }
    kinds["unchanged"] = pc.and_(pc.and_(both, same), pc.invert(kinds["retry"]))
    if full:
        kinds["full"] = kinds.pop("unchanged")
        kinds["unchanged"] = pc.and_(in_list, pc.invert(in_list))
    vanished = pc.and_(in_table, pc.invert(in_list))
    counts = {k: int(pc.sum(v).as_py() or 0) for k, v in kinds.items()}
    counts["vanished"] = int(pc.sum(vanished).as_py() or 0)
    counts["listed"] = listed.num_rows
    kind = pa.array([None] * joined.num_rows, pa.string())
    for k in KINDS:
        if k in kinds:
            kind = pc.if_else(kinds[k], k, kind)
    todo = joined.append_column("kind", kind).filter(pc.is_valid(kind)).select(TODO_SCHEMA.names)
    fs, root = output_fs(staging)
    fs.create_dir(f"{root}/todo", recursive=True)
    if todo.num_rows:
        pq.write_table(todo.cast(TODO_SCHEMA), f"{root}/todo/{b}.parquet", filesystem=fs,
                       row_group_size=TODO_GROUP)
    if prune and counts["vanished"]:
        fs.create_dir(f"{root}/vanished", recursive=True)
        gone = joined.filter(vanished).select(["image_id"])
        gone = gone.append_column("bucket", pa.array([b] * gone.num_rows, pa.int32()))
        pq.write_table(gone, f"{root}/vanished/{b}.parquet", filesystem=fs)
    return pa.table({"counts": [json.dumps(counts)]})


def _first_per_id(listed: pa.Table) -> pa.Table:
    """One row per image id (an image listed by two sources, or by a retried task)."""
    order = pc.sort_indices(listed, sort_keys=[("image_id", "ascending"), ("uri", "ascending")])
    listed = listed.take(order)
    ids = listed.column("image_id").to_numpy(zero_copy_only=False)
    keep = np.r_[True, ids[1:] != ids[:-1]] if len(ids) else np.zeros(0, bool)
    return listed.filter(pa.array(keep))


# -- what to annotate, as a dataset ---------------------------------------------------------

def todo_dataset(staging: str, sub: str, *, num_cpus: float) -> ray.data.Dataset:
    """The rows of STAGING/sub/*.parquet as a Ray dataset of one block per row group
    (TODO_GROUP rows; 1 for images being isolated), read by small tasks: Ray Data's own
    read and repartition tasks ask a whole CPU each, which model actors may hold."""
    fs, root = output_fs(staging)
    items = []
    for info in fs.get_file_info(pafs.FileSelector(f"{root}/{sub}", allow_not_found=True)):
        if info.path.endswith(".parquet"):
            groups = pq.ParquetFile(info.path, filesystem=fs).metadata.num_row_groups
            items += [{"path": info.path, "group": g} for g in range(groups)]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), MAX_BLOCKS))) \
        .map_batches(_read_group, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
                     fn_kwargs={"staging": staging})


def _read_group(batch: pa.Table, *, staging: str) -> pa.Table:
    fs, _ = output_fs(staging)
    path, group = batch.column("path")[0].as_py(), int(batch.column("group")[0].as_py())
    return pq.ParquetFile(path, filesystem=fs).read_row_group(group).cast(TODO_SCHEMA)


# -- after a pass: what did not land --------------------------------------------------------

def find_missing(table_uri: str, staging: str, buckets: int, *, run_id: str, source: str,
                 dest: str) -> int:
    """Images of STAGING/source/* with no current row written by `run_id` (their blocks
    were lost to crashed workers) into STAGING/dest/; returns how many."""
    tasks = ray.data.from_items([{"bucket": b} for b in range(buckets)],
                                override_num_blocks=buckets)
    out = tasks.map_batches(_missing_bucket, batch_size=1, batch_format="pyarrow", fn_kwargs={
        "table_uri": table_uri, "staging": staging, "run_id": run_id, "source": source,
        "dest": dest})
    return sum(int(r["missing"]) for r in out.iter_rows())


def _missing_bucket(batch: pa.Table, *, table_uri: str, staging: str, run_id: str, source: str,
                    dest: str) -> pa.Table:
    b = int(batch.column("bucket")[0].as_py())
    fs, root = output_fs(staging)
    path = f"{root}/{source}/{b}.parquet"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return pa.table({"missing": [0]})
    todo = pq.read_table(path, filesystem=fs)
    done = current_rows(table_uri, b, ["image_id"], where=col("run_id") == run_id)
    left = todo.join(done, keys="image_id", join_type="left anti", use_threads=False)
    if left.num_rows:
        fs.create_dir(f"{root}/{dest}", recursive=True)
        pq.write_table(left.select(TODO_SCHEMA.names).cast(TODO_SCHEMA), f"{root}/{dest}/{b}.parquet",
                       filesystem=fs, row_group_size=1)  # one image per block: isolated
    return pa.table({"missing": [left.num_rows]})
