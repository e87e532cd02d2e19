"""Listing and the diff against the table, as Ray tasks with bounded memory.

1. Listing: directories (spread over tasks by pipelines.lake.sources.plan_sources),
   manifests (read by Ray Data) and globs become listing rows in Ray tasks. Each task
   writes its rows, keyed by image_id, into per-part staging files
   (STAGING/listing/p=PART/*.parquet; a part is a hex prefix of image_id, as in the
   snapshot) and returns only counts. Directories that could not be listed are staged
   too (STAGING/unlisted): nothing under them is taken for vanished.
2. Diff: one task per snapshot part reads that part's listing files and that part's
   current view (pipelines.lake.table), joins them on image_id and writes what to
   annotate (STAGING/todo/PART.parquet) and what vanished. Parts split as the lake grows
   (pipelines.lake.upkeep), so a task's rows stay bounded whatever the lake's size.

No process ever holds more than one part of the lake, and the driver holds counts only.
A listing task that Ray retries writes its files again under new names: the diff drops
duplicate image ids, so a retry cannot list an image twice.
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import time
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
from pipelines.lake.table import col, open_table, output_fs, part_filter, part_index
from pipelines.lake.table import embed_weights as models_embed_weights

logger = logging.getLogger(__name__)

TODO_SCHEMA = pa.schema([("image_id", pa.string()), ("part", pa.string()), ("uri", pa.string()),
                         ("size", pa.int64()), ("fingerprint", pa.string()), ("kind", pa.string())])
KINDS = ("new", "changed", "retry", "stale", "full")  # what to annotate; the rest: unchanged, vanished
GLOB_BATCH = 50_000
TODO_GROUP = 256  # images per block entering the annotate pipeline (and lost with a dead task)
MAX_BLOCKS = 100_000


@dataclass(frozen=True)
class DiffCounts:
    listed: int = 0  # distinct images listed
    new: int = 0
    changed: int = 0
    retry: int = 0  # error rows of earlier runs tried again (transient errors)
    stale: int = 0  # results made by another embedder than this run's (a --full cut short)
    full: int = 0  # unchanged images re-annotated because of --full
    unchanged: int = 0
    vanished: int = 0  # current rows whose image was not listed
    unlistable: int = 0  # current rows under a directory that could not be listed (kept)
    unlisted_dirs: tuple[str, ...] = ()  # directories that could not be listed (first few)
    skipped: dict[str, int] = field(default_factory=dict)  # non-image files by extension

    @property
    def todo(self) -> int:
        return self.new + self.changed + self.retry + self.stale + self.full


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


# -- staging the listing by part -----------------------------------------------------------

def part_dir(part: str) -> str:
    return f"p={part or '_'}"


def stage_listing(ds: ray.data.Dataset, staging: str, parts: list[str]) -> dict[str, int]:
    """Write the listing into per-part staging files; returns non-images by extension."""
    skipped: Counter = Counter()
    stats = ds.map_batches(_stage_batch, batch_format="pyarrow", batch_size=S.LIST_BATCH,
                           fn_kwargs={"staging": staging, "parts": parts}, num_cpus=LIST_CPUS)
    for row in stats.iter_rows():
        skipped.update(json.loads(row["skipped"]))
    return dict(skipped)


def _stage_batch(batch: pa.Table, *, staging: str, parts: list[str]) -> pa.Table:
    fs, root = output_fs(staging)
    name = uuid.uuid4().hex
    if "list_error" in batch.column_names:
        failed = pc.is_valid(batch.column("list_error"))
        if pc.any(failed).as_py():
            fs.create_dir(f"{root}/unlisted", recursive=True)
            pq.write_table(batch.filter(failed).select(["uri", "list_error"]),
                           f"{root}/unlisted/{name}.parquet", filesystem=fs)
            batch = batch.filter(pc.invert(failed))
    glob_rows = batch.column("is_image")
    images = batch.filter(glob_rows)
    others = batch.filter(pc.invert(glob_rows))
    skipped = Counter(S.extension(u) for u in others.column("uri").to_pylist())
    uris = images.column("uri").to_pylist()
    ids = pa.array([S.image_id(u) for u in uris], pa.string())
    fps = [S.fingerprint(s, m, e) for s, m, e in zip(
        images.column("size").to_pylist(), images.column("mtime_ns").to_pylist(),
        images.column("etag").to_pylist(), strict=True)]
    idx = part_index(ids, parts) if len(ids) else np.zeros(0, np.int64)
    table = pa.table({"image_id": ids, "part": pa.array(np.asarray(parts, dtype=object)[idx], pa.string()),
                      "uri": images.column("uri"), "size": images.column("size"),
                      "fingerprint": pa.array(fps, pa.string())})
    order = np.argsort(idx, kind="stable")
    table, sorted_p = table.take(pa.array(order)), idx[order]
    starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]]) if len(order) else []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(order)
        d = part_dir(parts[int(sorted_p[start])])
        fs.create_dir(f"{root}/listing/{d}", recursive=True)
        pq.write_table(table.slice(start, end - start), f"{root}/listing/{d}/{name}.parquet",
                       filesystem=fs)
    return pa.table({"listed": [table.num_rows], "skipped": [json.dumps(skipped)]})


def unlisted_dirs(staging: str) -> list[str]:
    """Directories (and prefixes) that could not be listed this run."""
    t = read_bucket_files(staging, "unlisted")
    return sorted(set(t.column("uri").to_pylist())) if t is not None else []


# -- the diff -------------------------------------------------------------------------------

def diff(out: str, staging: str, parts: list[str], *, full: bool, prune: bool,
         embed_weights: str | None = None) -> DiffCounts:
    """Classify every listed image against the table's current view, part by part."""
    unlisted = unlisted_dirs(staging)
    tasks = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=max(1, len(parts)))
    out_ds = tasks.map_batches(_diff_part, batch_size=1, batch_format="pyarrow", fn_kwargs={
        "out": out, "staging": staging, "full": full, "prune": prune, "unlisted": unlisted,
        "embed_weights": embed_weights})
    totals: Counter = Counter()
    for row in out_ds.iter_rows():
        totals.update(json.loads(row["counts"]))
    return DiffCounts(**{k: int(totals.get(k, 0)) for k in (
        "listed", "new", "changed", "retry", "stale", "full", "unchanged", "vanished", "unlistable")},
        unlisted_dirs=tuple(unlisted[:20]))


def read_bucket_files(staging: str, sub: str) -> pa.Table | None:
    fs, root = output_fs(staging)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{sub}", allow_not_found=True))
    files = sorted(i.path for i in infos if i.path.endswith(".parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])


def current_rows(out: str, part: str, columns: list[str], *, where: pc.Expression | None = None) -> pa.Table:
    """One part's current view (results and errors)."""
    from pipelines.schema import TABLE_SCHEMA

    batches = list(open_table(out).current_part(part, columns, status=None, where=where))
    schema = pa.schema([TABLE_SCHEMA.field(c) for c in columns])
    return pa.Table.from_batches(batches).cast(schema) if batches else schema.empty_table()


def _diff_part(batch: pa.Table, *, out: str, staging: str, full: bool, prune: bool,
               unlisted: list[str], embed_weights: str | None) -> pa.Table:
    part = batch.column("part")[0].as_py()
    listed = read_bucket_files(staging, f"listing/{part_dir(part)}")
    if listed is None:
        listed = pa.schema([f for f in TODO_SCHEMA if f.name != "kind"]).empty_table()
    if pc.count_distinct(listed.column("image_id")).as_py() != listed.num_rows:
        listed = _first_per_id(listed)
    current = current_rows(out, part, ["image_id", "uri", "fingerprint", "status", "error_retryable",
                                       "models"])
    t_embed = models_embed_weights(current.column("models"))
    current = pa.table({"image_id": current.column("image_id"), "t_uri": current.column("uri"),
                        "t_fingerprint": current.column("fingerprint"), "t_status": current.column("status"),
                        "t_retryable": current.column("error_retryable"), "t_embed": t_embed})
    joined = listed.join(current, keys="image_id", join_type="full outer", use_threads=False)
    in_list = pc.is_valid(joined.column("uri"))
    in_table = pc.is_valid(joined.column("t_status"))
    fp, t_fp = joined.column("fingerprint"), joined.column("t_fingerprint")
    # a failed stat (no fingerprint) is not a change: the row stays as it is
    same = pc.or_(pc.fill_null(pc.equal(fp, t_fp), False), pc.is_null(fp))
    retryable = pc.and_(pc.fill_null(joined.column("t_retryable"), False),
                        pc.equal(joined.column("t_status"), "error"))
    both = pc.and_(in_list, in_table)
    unchanged_bytes = pc.and_(both, same)
    kinds = {
        "new": pc.and_(in_list, pc.invert(in_table)),
        "changed": pc.and_(both, pc.invert(same)),
        "retry": pc.and_(unchanged_bytes, pc.fill_null(retryable, False)),
    }
    stale = pc.and_(unchanged_bytes, pc.invert(kinds["retry"]))
    if embed_weights is not None:
        other = pc.and_(pc.equal(joined.column("t_status"), "ok"),  # rows naming no embedder: as they are
                        pc.not_equal(joined.column("t_embed"), embed_weights))
        kinds["stale"] = pc.fill_null(pc.and_(stale, other), False)
        kinds["unchanged"] = pc.and_(stale, pc.invert(kinds["stale"]))
    else:
        kinds["unchanged"] = stale
    if full:
        kinds["full"] = kinds.pop("unchanged")
        kinds["unchanged"] = pc.and_(in_list, pc.invert(in_list))
    vanished = pc.and_(in_table, pc.invert(in_list))
    if unlisted:
        uris = joined.column("t_uri")
        under = None
        for d in unlisted:
            hit = pc.fill_null(pc.starts_with(uris, d.rstrip("/") + "/"), False)
            under = hit if under is None else pc.or_(under, hit)
        kept = pc.and_(vanished, under)
        vanished = pc.and_(vanished, pc.invert(under))
    else:
        kept = pc.and_(in_list, pc.invert(in_list))
    counts = {k: int(pc.sum(v).as_py() or 0) for k, v in kinds.items()}
    counts["vanished"] = int(pc.sum(vanished).as_py() or 0)
    counts["unlistable"] = int(pc.sum(kept).as_py() or 0)
    counts["listed"] = listed.num_rows
    kind = pa.array([None] * joined.num_rows, pa.string())
    for k in KINDS:
        if k in kinds:
            kind = pc.if_else(kinds[k], k, kind)
    todo = joined.append_column("kind", kind).filter(pc.is_valid(kind))
    todo = todo.set_column(todo.schema.get_field_index("part"), "part",
                           pa.array([part] * todo.num_rows, pa.string())).select(TODO_SCHEMA.names)
    fs, root = output_fs(staging)
    name = part or "_"
    fs.create_dir(f"{root}/todo", recursive=True)
    if todo.num_rows:
        pq.write_table(todo.cast(TODO_SCHEMA), f"{root}/todo/{name}.parquet", filesystem=fs,
                       row_group_size=TODO_GROUP)
    if prune and counts["vanished"]:
        fs.create_dir(f"{root}/vanished", recursive=True)
        gone = joined.filter(vanished)
        gone = pa.table({"image_id": gone.column("image_id"), "uri": gone.column("t_uri"),
                         "fingerprint": gone.column("t_fingerprint")})
        pq.write_table(gone, f"{root}/vanished/{name}.parquet", filesystem=fs)
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


READY = "_READY"  # STAGING/sub/_READY: "go" once the diff's todo files are final, else "stop"


def awaited_todo_dataset(staging: str, sub: str, *, slots: int, num_cpus: float) -> ray.data.Dataset:
    """The rows STAGING/sub/*.parquet will hold once the driver releases them
    (release_todo), as todo_dataset reads them (a block per row group of TODO_GROUP rows):
    a pipeline over them starts (its model actors start) while the listing and the diff
    still run. `slots` small tasks, asking no CPU (they wait, and the diff's tasks must
    find CPUs), wait for the word, then name the row groups of every slots-th file."""
    return ray.data.from_items([{"slot": i} for i in range(slots)], override_num_blocks=slots) \
        .map_batches(_slot_groups, batch_size=1, batch_format="pyarrow", num_cpus=0,
                     fn_kwargs={"staging": staging, "sub": sub, "slots": slots}) \
        .repartition(target_num_rows_per_block=1) \
        .map_batches(_read_group, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus,
                     fn_kwargs={"staging": staging})


def release_todo(staging: str, sub: str, *, go: bool) -> None:
    """Let awaited_todo_dataset's tasks read STAGING/sub (go), or end with no rows."""
    fs, root = output_fs(staging)
    fs.create_dir(f"{root}/{sub}", recursive=True)
    with fs.open_output_stream(f"{root}/{sub}/{READY}") as f:
        f.write(b"go" if go else b"stop")


def _slot_groups(batch: pa.Table, *, staging: str, sub: str, slots: int) -> pa.Table:
    slot = int(batch.column("slot")[0].as_py())
    fs, root = output_fs(staging)
    marker, pause = f"{root}/{sub}/{READY}", 0.5 if S.is_remote(staging) else 0.05
    while fs.get_file_info(marker).type != pafs.FileType.File:
        time.sleep(pause)
    with fs.open_input_stream(marker) as f:
        go = f.read() == b"go"
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(f"{root}/{sub}", allow_not_found=True))
                   if go and i.path.endswith(".parquet"))
    items = [(path, g) for path in files[slot::slots]
             for g in range(pq.ParquetFile(path, filesystem=fs).metadata.num_row_groups)]
    return pa.table({"path": pa.array([p for p, _ in items], pa.string()),
                     "group": pa.array([g for _, g in items], pa.int64())})


def _read_group(batch: pa.Table, *, staging: str) -> pa.Table:
    fs, _ = output_fs(staging)
    path, group = batch.column("path")[0].as_py(), int(batch.column("group")[0].as_py())
    return pq.ParquetFile(path, filesystem=fs).read_row_group(group).cast(TODO_SCHEMA)


# -- after a pass: what did not land --------------------------------------------------------

def find_missing(out: str, staging: str, parts: list[str], *, run_id: str, since: int, source: str,
                 dest: str) -> int:
    """Images of STAGING/source/* with no log row written by `run_id` after version
    `since` (their blocks were lost to crashed workers) into STAGING/dest/; returns how many."""
    tasks = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=max(1, len(parts)))
    result = tasks.map_batches(_missing_part, batch_size=1, batch_format="pyarrow", fn_kwargs={
        "out": out, "staging": staging, "run_id": run_id, "since": since, "source": source,
        "dest": dest})
    return sum(int(r["missing"]) for r in result.iter_rows())


def _missing_part(batch: pa.Table, *, out: str, staging: str, run_id: str, since: int, source: str,
                  dest: str) -> pa.Table:
    part = batch.column("part")[0].as_py()
    fs, root = output_fs(staging)
    name = part or "_"
    path = f"{root}/{source}/{name}.parquet"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return pa.table({"missing": [0]})
    todo = pq.read_table(path, filesystem=fs)
    flt = (pc.field("committed_in") > since) & (col("run_id") == run_id)
    if part_filter(part) is not None:
        flt = flt & part_filter(part)
    table = open_table(out)
    done = table.log_dataset(since).to_table(columns=["image_id"], filter=flt)
    done = done.cast(pa.schema([("image_id", pa.string())]))
    left = todo.join(done, keys="image_id", join_type="left anti", use_threads=False)
    if left.num_rows:
        fs.create_dir(f"{root}/{dest}", recursive=True)
        pq.write_table(left.select(TODO_SCHEMA.names).cast(TODO_SCHEMA), f"{root}/{dest}/{name}.parquet",
                       filesystem=fs, row_group_size=1)  # one image per block: isolated
    return pa.table({"missing": [left.num_rows]})
