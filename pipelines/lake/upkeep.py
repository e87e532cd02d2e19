"""Table upkeep: the snapshot rebuilt one part at a time, erasure, and migration.

A night appends to the log only (pipelines.lake.table). Upkeep then rebuilds the
snapshot parts whose log rows since their watermark reached their share of the part:
a part of S rows is rewritten after about S * ratio rows changed in it (each part's ratio
is spread over [ratio, 1.5 * ratio] by a hash of its name, so parts of a uniformly
hashed lake come due on different nights, not all on one). Every byte a night appends is
then written about 1 + 1/ratio times in all, whatever the lake's size, and a part that
outgrows `max_part_rows` is split into its 16 sub-prefixes by the same rewrite.

`forget` tombstones images at once; their bytes leave the snapshot (their parts are
rebuilt), the log (the files holding their rows are rewritten without them), the
near-duplicate edges naming them (pipelines.dedup.erase) and the legacy history at the
next upkeep, followed by a vacuum of the replaced files.

`migrate` brings a schema 2/3 table (DIR/table, one SCD2 table) to schema 4 in place:
its current rows become the snapshot, part by part; DIR/table stays as the history
before the migration.
"""

from __future__ import annotations

import logging
import time
import uuid
import zlib
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable

from models.errors import LakelensError
from pipelines.lake.lock import acquire
from pipelines.lake.table import (
    HEX,
    LEGACY_DIR,
    LakeTable,
    NeedsMigration,
    col,
    create_tables,
    initial_parts,
    legacy_table,
    location,
    open_table,
    output_fs,
    part_index,
    read_json,
    write_json,
)
from pipelines.schema import SCHEMA_VERSION, SNAPSHOT_SCHEMA, TABLE_SCHEMA

logger = logging.getLogger(__name__)

DEFAULT_RATIO = 1.25  # a part is rebuilt once the rows changed in it reach this share of it
MAX_PART_ROWS = 1_000_000  # a part past this is split 16 ways (a rebuild holds one part)
FORGET_DIR = "_lakelens/forget"  # ids tombstoned by `forget` whose bytes are not yet gone
ERASE_BATCH = 2_000  # ids per delete predicate


def _ratio(table: LakeTable, part: str) -> float:
    base = float(table.meta.get("upkeep_ratio", DEFAULT_RATIO))
    return base * (1.0 + 0.5 * (zlib.crc32(part.encode()) / 2**32))


STATE_FILE = "_lakelens/upkeep.json"  # per part: log rows since its watermark, counted so far


def _count(table: LakeTable, parts: list[str], after: int, marks: np.ndarray) -> np.ndarray:
    counts = np.zeros(len(parts), dtype=np.int64)
    scanner = table.log_dataset(after).scanner(columns=["image_id", "committed_in"],
                                               filter=pc.field("committed_in") > after)
    for batch in scanner.to_batches():
        if batch.num_rows:
            idx = part_index(batch.column("image_id"), parts)
            later = batch.column("committed_in").to_numpy() > marks[idx]
            counts += np.bincount(idx[later], minlength=len(parts))
    return counts


def changed_rows(table: LakeTable, parts: list[str]) -> dict[str, int]:
    """Log rows per part committed after that part's watermark. Counted incrementally: a
    night reads only the rows committed since the last count (DIR/_lakelens/upkeep.json);
    without that record, once from the lowest watermark."""
    fs, root = output_fs(table.out)
    state = read_json(fs, f"{root}/{STATE_FILE}") or {}
    marks = np.array([table.watermark(p) for p in parts], dtype=np.int64)
    known = state.get("changed", {})
    through = state.get("counted_through")
    if through is None or any(p not in known for p in parts) or through > table.version:
        through, base = (int(marks.min()) if len(marks) else -1), np.zeros(len(parts), np.int64)
    else:
        base = np.array([int(known[p]) for p in parts], dtype=np.int64)
    counts = base + _count(table, parts, int(through), marks)
    return dict(zip(parts, counts.tolist(), strict=True))


def _save_counts(table: LakeTable, counts: dict[str, int]) -> None:
    fs, root = output_fs(table.out)
    write_json(fs, f"{root}/{STATE_FILE}", {"counted_through": table.version, "changed": counts})


def due_parts(table: LakeTable, *, extra: set[str] = frozenset()) -> tuple[list[tuple[str, int, int]], dict]:
    """(part, snapshot rows, changed rows) of the parts to rebuild now, plus `extra`; and
    every part's changed rows."""
    parts = table.parts()
    stats = table.part_stats()
    changed = changed_rows(table, parts)
    due = []
    for p in parts:
        rows = max(stats.get(p, 0) - 1, 0)  # the watermark row is not an image
        if p in extra or (changed[p] and changed[p] >= rows * _ratio(table, p)) or (
                changed[p] and table.watermark(p) < 0):
            due.append((p, rows, changed[p]))
    return due, changed


def rebuild_parts(table: LakeTable, parts: list[str]) -> list[dict]:
    """Rewrite parts of the snapshot from their current view, in one commit (each split 16
    ways when it has outgrown the table's max_part_rows). Holds those parts' rows: the
    caller groups small parts, a large one goes alone."""
    version = table.version
    limit = int(table.meta.get("max_part_rows", MAX_PART_ROWS))
    tables, children, done = [], [], []
    for part in parts:
        batches = list(table.current_part(part, list(TABLE_SCHEMA.names), status=None))
        rows = pa.Table.from_batches(batches, schema=TABLE_SCHEMA) if batches else TABLE_SCHEMA.empty_table()
        names = [part + h for h in HEX] if rows.num_rows > limit else [part]
        idx = part_index(rows.column("image_id"), names) if rows.num_rows else np.zeros(0, int)
        tables.append(rows.append_column("part", pa.array(np.asarray(names, dtype=object)[idx], pa.string())))
        children += names
        done.append({"part": part, "rows": rows.num_rows, "split": len(names) > 1})
        if len(names) > 1:
            logger.info("split snapshot part %r (%d rows) into %d parts", part, rows.num_rows, len(names))
    rows = pa.concat_tables(tables).sort_by("image_id")
    table.write_part(parts, rows, version=version, children=children)
    table.refresh()
    return done


def _groups(due: list[tuple[str, int, int]], limit: int) -> list[list[str]]:
    """Due parts in commits of at most about `limit` rows each (small parts share one)."""
    groups: list[list[str]] = []
    size = limit + 1
    for part, rows, changed in due:
        if size + rows + changed > limit:
            groups.append([])
            size = 0
        groups[-1].append(part)
        size += rows + changed
    return groups


def run_upkeep(table: LakeTable, *, erase: bool = True) -> dict:
    """Rebuild the parts that are due, then carry out pending erasures. Call under the
    run lock. Returns what was done."""
    started = time.perf_counter()
    table.refresh()
    pending = _pending_erasures(table) if erase else None
    extra = set()
    if pending is not None and pending.num_rows:
        parts = table.parts()
        extra = {parts[i] for i in np.unique(part_index(pending.column("image_id"), parts))}
    due, changed = due_parts(table, extra=extra)
    groups = _groups(due, int(table.meta.get("max_part_rows", MAX_PART_ROWS)))
    bare = [p for p in table.parts() if p not in table.part_stats()]
    if bare and (len(groups) > 1 or set(bare) - set(groups[0] if groups else [])):
        # every part gets its watermark row first (-1: none absorbed), in one commit, so that
        # the floor a reader takes from those rows stays right if a later commit fails
        table.write_part([], SNAPSHOT_SCHEMA.empty_table(), version=-1, children=bare)
    rebuilt = [r for group in groups for r in rebuild_parts(table, group)]
    table.refresh()
    done = {p for p, _, _ in due}
    _save_counts(table, {p: 0 if p in done else changed.get(p, 0) for p in table.parts()})
    result = {"parts": len(table.parts()), "rebuilt": len(rebuilt),
              "rows_rewritten": sum(r["rows"] for r in rebuilt),
              "splits": sum(r["split"] for r in rebuilt), "erased": 0}
    if pending is not None and pending.num_rows:
        result |= _erase(table, pending)
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["floor"] = table.floor()
    if rebuilt:
        logger.info("upkeep of %s: %d parts rebuilt (%d rows), %d split", table.out, len(rebuilt),
                    result["rows_rewritten"], result["splits"])
    return result


# -- right to erasure ---------------------------------------------------------------------

def _pending_erasures(table: LakeTable) -> pa.Table | None:
    fs, root = output_fs(table.out)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{FORGET_DIR}", allow_not_found=True))
    files = sorted(i.path for i in infos if i.path.endswith(".parquet"))
    if not files:
        return None
    ids = pa.concat_tables([pq.read_table(f, filesystem=fs, columns=["image_id"]) for f in files])
    return ids.group_by("image_id").aggregate([])


def _erase(table: LakeTable, ids: pa.Table) -> dict:
    """Remove every non-tombstone row of `ids` from the log and the legacy history (the
    files holding them are rewritten), then vacuum the replaced files (log, snapshot,
    legacy): their bytes are gone from the disk."""
    values = ids.column("image_id").to_pylist()
    deleted = table.erase(ids.column("image_id").combine_chunks(), run_id="erase")
    legacy = legacy_table(table.out)
    if legacy is not None:  # the history before a migration (delta-rs's delete: it is read-only)
        for start in range(0, len(values), ERASE_BATCH):
            quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in values[start:start + ERASE_BATCH])
            deleted += int(legacy.delete(f"image_id IN ({quoted})").get("num_deleted_rows", 0))
        legacy.vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False)
    table.vacuum(retention_hours=0)
    from pipelines import dedup

    edges = dedup.erase(table.out, ids.column("image_id").combine_chunks())  # either side, vacuumed
    fs, root = output_fs(table.out)
    fs.delete_dir_contents(f"{root}/{FORGET_DIR}", missing_dir_ok=True)
    logger.info("erased %d images (%d log rows) from %s", len(values), deleted, table.out)
    return {"erased": len(values), "log_rows_deleted": deleted, "dedup_edges_deleted": edges}


def forget(out: str, *, ids_file: str | None = None, where: str | None = None, upkeep: bool = True) -> dict:
    """Tombstone the images named by `ids_file` (one image_id per line, or a Parquet file
    with an image_id column) or selected by `where` (SQL over the current view), and
    unless `upkeep` is False remove their bytes now."""
    if (ids_file is None) == (where is None):
        raise LakelensError("forget: give exactly one of --ids FILE or --where SQL")
    table = open_table(out)
    run_id = "forget-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    with acquire(out, run_id) as lock:
        epoch = table.fence(lock.epoch, run_id=run_id)
        wanted = _read_ids(ids_file) if ids_file else _select_ids(out, where)
        current = _current_of(table, wanted)
        now = datetime.now(UTC)
        n = current.num_rows
        cols = {"image_id": current.column("image_id"), "status": pa.array(["tombstone"] * n),
                "reason": pa.array(["forgotten"] * n), "run_id": pa.array([run_id] * n),
                "annotated_at": pa.array([now] * n, TABLE_SCHEMA.field("annotated_at").type)}
        rows = pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in TABLE_SCHEMA},
                        schema=TABLE_SCHEMA)
        fs, root = output_fs(out)
        if n:
            fs.create_dir(f"{root}/{FORGET_DIR}", recursive=True)
            pq.write_table(current.select(["image_id"]), f"{root}/{FORGET_DIR}/{run_id}.parquet",
                           filesystem=fs)
            table.commit(rows, run_id=run_id, seq=1, epoch=epoch, info={"forgotten": n})
        result = {"action": "forget", "asked": len(wanted), "forgotten": n, "table_version": table.version}
        if upkeep:
            result["upkeep"] = run_upkeep(table)
    return result


def _read_ids(path: str) -> list[str]:
    try:
        if path.endswith(".parquet"):
            return [i for i in pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist() if i]
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, KeyError, pa.ArrowInvalid) as e:
        raise LakelensError(f"--ids {path}: cannot read image ids ({e})") from e


def _select_ids(out: str, where: str) -> list[str]:
    import duckdb

    from pipelines.lake.results import connect

    con = connect(out)
    try:
        reader = con.sql(f"SELECT image_id FROM current WHERE {where}").fetch_record_batch(65_536)
        return [i for b in reader for i in b.column(0).to_pylist()]
    except duckdb.Error as e:
        raise LakelensError(f"--where failed: {str(e).strip().splitlines()[0][:300]}") from e


def _current_of(table: LakeTable, ids: list[str]) -> pa.Table:
    """Those of `ids` that have a current row (result or error)."""
    if not ids:
        return pa.table({"image_id": pa.array([], pa.string())})
    parts = table.parts()
    arr = pa.array(sorted(set(ids)), pa.string())
    idx = part_index(arr, parts)
    found = []
    for i in np.unique(idx):
        want = arr.filter(pa.array(idx == i))
        for b in table.current_part(parts[i], ["image_id"], status=None, where=col("image_id").isin(want)):
            found.append(b.column(0))
    return pa.table({"image_id": pa.concat_arrays(found) if found else pa.array([], pa.string())})


# -- migration from schema 2/3 --------------------------------------------------------------

def migrate_locked(out: str, *, epoch: int, run_id: str) -> dict:
    """Schema 2/3 -> 4, by a writer holding the run lock: the legacy table's current rows
    become the snapshot (staged by part, then one commit per part), DIR/table is kept as
    the history before. Rerunnable: a migration cut short starts again from its staging."""
    started = time.perf_counter()
    fs, root = output_fs(out)
    meta = read_json(fs, f"{root}/lakelens.json")
    legacy = DeltaTable(location(out, LEGACY_DIR))
    create_tables(out)
    log, snap = DeltaTable(location(out, "log")), DeltaTable(location(out, "current"))
    dataset = legacy.to_pyarrow_dataset()
    current = dataset.count_rows(filter=pc.field("is_current"))
    # parts of at most half of MAX_PART_ROWS from the start: a 100M-image table gets 256
    parts = initial_parts(max(16, -(-2 * current // MAX_PART_ROWS)))
    staging = f"{root}/_lakelens/migrate"
    fs.delete_dir_contents(staging, missing_dir_ok=True)
    have = set(dataset.schema.names)
    rows = 0
    # Pass 1: the legacy table's current rows, streamed, staged by part.
    columns = [c for c in TABLE_SCHEMA.names if c in have]
    scanner = dataset.scanner(filter=pc.field("is_current"), columns=columns, batch_size=262_144,
                              batch_readahead=1, fragment_readahead=1)
    for b, batch in enumerate(scanner.to_batches()):  # streamed: one batch held at a time
        n = batch.num_rows
        if not n:
            continue
        cur = pa.Table.from_batches([batch])
        extra = {"committed_in": pa.array(np.zeros(n, np.int64)), "reason": pa.array(["migrated"] * n)}
        cur = pa.table({f.name: cur.column(f.name) if f.name in cur.column_names and f.name not in extra
                        else extra.get(f.name, pa.nulls(n, f.type)) for f in TABLE_SCHEMA}).cast(TABLE_SCHEMA)
        idx = part_index(cur.column("image_id"), parts)
        for i in np.unique(idx):
            fs.create_dir(f"{staging}/{i}", recursive=True)
            pq.write_table(cur.filter(pa.array(idx == i)), f"{staging}/{i}/{b}.parquet", filesystem=fs)
        rows += n
    # Pass 2: one commit per part (its rows and its watermark: the log's version now).
    table = LakeTable(out, log, snap, {**meta, "parts": parts})
    epoch = table.fence(epoch, run_id=run_id)
    for i, part in enumerate(parts):
        infos = fs.get_file_info(pafs.FileSelector(f"{staging}/{i}", allow_not_found=True))
        files = sorted(x.path for x in infos if x.path.endswith(".parquet"))
        data = (pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files]) if files
                else TABLE_SCHEMA.empty_table()).sort_by("image_id")
        data = data.append_column("part", pa.array([part] * data.num_rows, pa.string()))
        table.write_part([part], data, version=table.version, children=[part])
    fs.delete_dir_contents(staging, missing_dir_ok=True)
    meta = {**meta, "schema_version": SCHEMA_VERSION, "parts": parts,
            "migrated": {"from": str(meta.get("schema_version")), "legacy_version": legacy.version(),
                         "rows": rows, "at": datetime.now(UTC).isoformat()}}
    meta.pop("buckets", None)
    write_json(fs, f"{root}/lakelens.json", meta)
    logger.info("migrated %s to schema %s: %d current rows into %d parts (%.1f s)", out, SCHEMA_VERSION,
                rows, len(parts), time.perf_counter() - started)
    return {"action": "migrate", "rows": rows, "parts": len(parts), "epoch": epoch,
            "seconds": round(time.perf_counter() - started, 3)}


def migrate(out: str) -> dict:
    """`lakelens migrate DIR`: a schema 2/3 table to schema 4 under the run lock."""
    try:
        open_table(out)
        return {"action": "migrate", "rows": 0, "parts": 0, "already": True}
    except NeedsMigration:
        pass
    run_id = "migrate-" + uuid.uuid4().hex[:8]
    with acquire(out, run_id) as lock:
        return migrate_locked(out, epoch=lock.epoch, run_id=run_id)


def describe(result: dict) -> str:
    if result.get("action") == "migrate":
        if result.get("already"):
            return f"already at schema {SCHEMA_VERSION}; nothing to do"
        return (f"migrated to schema {SCHEMA_VERSION}: {result['rows']} current rows into "
                f"{result['parts']} snapshot parts in {result['seconds']:.1f} s")
    if result.get("action") == "forget":
        text = f"{result['forgotten']} of {result['asked']} images tombstoned"
        up = result.get("upkeep")
        if up:
            text += (f"; {up.get('erased', 0)} erased ({up.get('log_rows_deleted', 0)} log rows deleted, "
                     f"{up.get('dedup_edges_deleted', 0)} near-duplicate edges deleted, "
                     f"{up['rebuilt']} snapshot parts rebuilt, replaced files vacuumed)")
        else:
            text += "; their bytes go at the next upkeep (the next annotate, or forget without --no-upkeep)"
        return text
    return ", ".join(f"{k} {v}" for k, v in result.items())


def compact(out: str, *, retention_hours: int) -> dict:
    """Upkeep now (due snapshot parts rebuilt, pending erasures done), then vacuum files no
    version within `retention_hours` needs, under the run lock (no run commits meanwhile)."""
    if retention_hours < 1:
        raise LakelensError(f"--retention-hours must be >= 1, got {retention_hours}")
    table = open_table(out)
    with acquire(out, f"compact-{uuid.uuid4().hex[:6]}") as lock:
        table.fence(lock.epoch, run_id="compact")
        done = run_upkeep(table)
        done["vacuumed"] = table.vacuum(retention_hours=retention_hours)
        done["version"] = table.version
        return done
