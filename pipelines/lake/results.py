"""`lakelens results`: what a table holds, SQL over it with DuckDB, and its upkeep.

DuckDB reads the table version's Parquet files (local tables) or deltalake's pyarrow
dataset (object stores), with no DuckDB extension to download: `results` is the current
view (`is_current`), `history` every row ever committed.
"""

from __future__ import annotations

import contextlib
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
DEFAULT_BATCH_ROWS = 65_536  # result rows per record batch written by --out


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


def _relation(con: duckdb.DuckDBPyConnection, sql: str | None, history: bool) -> duckdb.DuckDBPyRelation:
    sql = sql or ("SELECT * FROM history" if history else DEFAULT_SQL)
    try:
        rel = con.sql(sql)
    except duckdb.Error as e:
        raise _sql_error(e) from e
    if rel is None:
        raise LakelensError("--sql must be a query that returns rows (SELECT ...)")
    return rel


def _sql_error(e: duckdb.Error) -> LakelensError:
    first = str(e).strip().splitlines()[0][:300]
    return LakelensError(f"--sql failed: {first}")


def query(out: str, sql: str | None, *, history: bool = False, limit: int | None = None) -> pa.Table:
    """The result of `sql` (default: the current view without embeddings) as one Arrow
    table: at most `limit` rows when given (DuckDB stops there). For small results; `write`
    streams a result of any size to a file."""
    rel = _relation(connect(out), sql, history)
    try:
        return (rel if limit is None else rel.limit(limit)).to_arrow_table()
    except duckdb.Error as e:
        raise _sql_error(e) from e


def write(out: str, sql: str | None, path: str, *, history: bool = False,
          batch_rows: int = DEFAULT_BATCH_ROWS) -> int:
    """Stream the result of `sql` into `path` (.parquet: every column; .csv: the columns
    that are not nested), `batch_rows` rows at a time, under a temporary name renamed into
    place at the end. Returns the number of rows written."""
    if not path.endswith((".parquet", ".csv")):
        raise LakelensError(f"--out {path!r}: choose a .parquet or .csv file name")
    rel = _relation(connect(out), sql, history)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    rows = 0
    try:
        reader = rel.to_arrow_reader(batch_rows)
        schema = reader.schema
        if path.endswith(".parquet"):
            writer = pq.ParquetWriter(tmp, schema)
            keep = None
        else:
            keep = [f.name for f in schema if not pa.types.is_nested(f.type)]
            if len(keep) < len(schema):
                logger.warning("CSV has no nested columns: wrote %d of %d columns (use .parquet for all)",
                               len(keep), len(schema))
            writer = pacsv.CSVWriter(tmp, pa.schema([schema.field(c) for c in keep]))
        with writer:
            for batch in reader:
                writer.write_batch(batch if keep is None else batch.select(keep))
                rows += batch.num_rows
        os.replace(tmp, path)
    except duckdb.Error as e:
        raise _sql_error(e) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return rows


def format_table(table: pa.Table) -> str:
    """The first MAX_PRINT_ROWS rows of `table` as text; a table of more (query it with
    limit=MAX_PRINT_ROWS + 1) ends with a line saying there are more rows."""
    df = table.slice(0, MAX_PRINT_ROWS).to_pandas()
    text = df.to_string(index=False, max_colwidth=60)
    if table.num_rows > MAX_PRINT_ROWS:
        text += "\n... more rows (use --out FILE for all)"
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
