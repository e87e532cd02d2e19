"""`lakelens results`: what a table holds, SQL over it with DuckDB, and its upkeep.

DuckDB reads the table version's Parquet files (local tables) or deltalake's pyarrow
dataset (object stores), with no DuckDB extension to download: `results` is the current
view (`is_current`), `history` every row ever committed.
"""

from __future__ import annotations

import logging
import os
import uuid

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from models.errors import LakelensError
from pipelines.lake.lock import acquire
from pipelines.lake.table import open_table
from pipelines.schema import TABLE_SCHEMA

logger = logging.getLogger(__name__)

DEFAULT_SQL = "SELECT * EXCLUDE (embedding) FROM results"
MAX_PRINT_ROWS = 50


def connect(out: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with `results` (current view) and `history` (every row)."""
    table = open_table(out)
    con = duckdb.connect()
    files = table.dt.file_uris()
    if files and all(os.path.isabs(f) for f in files):
        # DuckDB reads the table version's Parquet files itself. Going through pyarrow's
        # dataset instead, a string filter fails on the files delta-rs rewrote in Arrow
        # string_view (delta-io/delta-rs#4579).
        listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        columns = ", ".join(f'"{f.name}"' for f in TABLE_SCHEMA)
        # unioned by name with an empty table of the full schema: a column no file has yet
        # (a version 2 table's semantic) reads as null
        con.register("_lakelens_schema", TABLE_SCHEMA.empty_table())
        con.execute(f"CREATE VIEW history AS SELECT {columns} FROM (SELECT * FROM read_parquet([{listed}], "
                    "hive_partitioning = true, hive_types = {'bucket': INTEGER}, union_by_name = true) "
                    "UNION ALL BY NAME SELECT * FROM _lakelens_schema)")
    else:  # an empty table, or one on an object store (pyarrow's filesystems reach it)
        con.register("history", table.dataset())
    con.execute("CREATE VIEW results AS SELECT * FROM history WHERE is_current")
    return con


def query(out: str, sql: str | None, *, history: bool = False) -> pa.Table:
    con = connect(out)
    sql = sql or ("SELECT * FROM history" if history else DEFAULT_SQL)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0][:300]
        raise LakelensError(f"--sql failed: {first}") from e


def write(table: pa.Table, path: str) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    if path.endswith(".parquet"):
        pq.write_table(table, tmp)
    elif path.endswith(".csv"):
        flat = table.select([c for c in table.column_names
                             if not pa.types.is_nested(table.schema.field(c).type)])
        if flat.num_columns < table.num_columns:
            logger.warning("CSV has no nested columns: wrote %d of %d columns (use .parquet for all)",
                           flat.num_columns, table.num_columns)
        pacsv.write_csv(flat, tmp)
    else:
        raise LakelensError(f"--out {path!r}: choose a .parquet or .csv file name")
    os.replace(tmp, path)


def format_table(table: pa.Table) -> str:
    df = table.slice(0, MAX_PRINT_ROWS).to_pandas()
    text = df.to_string(index=False, max_colwidth=60)
    if table.num_rows > MAX_PRINT_ROWS:
        text += f"\n... {table.num_rows - MAX_PRINT_ROWS} more rows (use --out FILE for all)"
    return text


def summary(out: str) -> str:
    """Counts of the current view by status, stage and error type, and the last runs."""
    table = open_table(out)
    con = connect(out)
    total, current = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE is_current) FROM history").fetchone()
    lines = [f"{out}: table version {table.version}, {current} images ({total} rows with history)"]
    for status, n in con.execute(
            "SELECT status, count(*) FROM results GROUP BY status ORDER BY status").fetchall():
        lines.append(f"  {status:<6} {n}")
    errors = con.execute(
        "SELECT error_stage, error_type, error_retryable, count(*) AS n FROM results "
        "WHERE status = 'error' GROUP BY ALL ORDER BY n DESC LIMIT 20").fetchall()
    if errors:
        lines.append("  errors by stage and type:")
        lines += [f"    {stage}/{etype}{' (retried next run)' if retry else ''}: {n}"
                  for stage, etype, retry, n in errors]
    runs = con.execute(
        "SELECT run_id, count(*) AS n, strftime(min(annotated_at), '%Y-%m-%d %H:%M:%S') AS first_at "
        "FROM history GROUP BY run_id ORDER BY first_at DESC LIMIT 5").fetchall()
    if runs:
        lines.append("  latest runs (rows written, first commit UTC):")
        lines += [f"    {run} {n} {at}" for run, n, at in runs]
    return "\n".join(lines)


def compact(out: str, *, retention_hours: int) -> dict:
    """optimize + vacuum under the run lock (so no run commits meanwhile)."""
    if retention_hours < 1:
        raise LakelensError(f"--retention-hours must be >= 1, got {retention_hours}")
    table = open_table(out)
    with acquire(out, f"compact-{uuid.uuid4().hex[:6]}"):
        return table.compact(retention_hours=retention_hours)
