"""`lakelens results`: what a table holds, SQL over it with DuckDB, and its upkeep.

DuckDB scans deltalake's pyarrow datasets of the log and the snapshot (no DuckDB
extension to download, no list of files in the SQL): `current` is the current view (one
row per image), `history` every row ever committed.
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
from pipelines.lake.table import legacy_table, open_table
from pipelines.schema import TABLE_SCHEMA

logger = logging.getLogger(__name__)

DEFAULT_SQL = "SELECT * EXCLUDE (embedding) FROM results"
MAX_PRINT_ROWS = 50
DEFAULT_BATCH_ROWS = 65_536  # result rows per record batch written by --out


def current_sql(log: str, snapshot: str, floor: int | str) -> str:
    """The current view in portable SQL over the log and the snapshot (DuckDB, Spark; see
    the README). `floor`: at most the lowest part watermark, e.g. `(SELECT
    min(committed_in) FROM snapshot WHERE status = 'watermark')`. The latest row of each
    image changed since is found from two columns (image_id, committed_in), and no
    whole-row CTE is read twice."""
    cols = ", ".join(TABLE_SCHEMA.names)
    return (f"WITH keys AS (SELECT image_id, max(committed_in) AS committed_in FROM {log} "
            f"WHERE committed_in > {floor} GROUP BY image_id) "
            f"SELECT {cols} FROM {snapshot} s WHERE s.status IN ('ok', 'error') "
            "AND s.image_id NOT IN (SELECT image_id FROM keys) "
            f"UNION ALL SELECT {', '.join('l.' + c for c in TABLE_SCHEMA.names)} FROM {log} l "
            "JOIN keys k ON l.image_id = k.image_id AND l.committed_in = k.committed_in "
            f"WHERE l.committed_in > {floor} AND l.status IN ('ok', 'error')")


def connect(out: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with `current` (one row per image; also named `results`),
    `history` (every row appended since schema 4, and a migrated table's rows before),
    `log` and `snapshot`. Each is an Arrow dataset scan: DuckDB pushes filters and
    projections into it, streams it, and never needs a list of every file."""
    table = open_table(out)
    con = duckdb.connect()
    log, snap = table.log_dataset(), table.snapshot_dataset()
    con.register("_log", log)
    con.register("_snapshot", snap)
    con.execute("CREATE VIEW log AS SELECT * FROM _log")
    con.execute("CREATE VIEW snapshot AS SELECT * FROM _snapshot")
    legacy = _legacy_dataset(out)
    if legacy is not None:
        con.register("_legacy", legacy)
        con.execute("CREATE VIEW history AS SELECT * FROM log UNION ALL BY NAME SELECT * FROM _legacy")
    else:
        con.execute("CREATE VIEW history AS SELECT * FROM log")
    con.execute(f"CREATE VIEW current AS {current_sql('log', 'snapshot', table.floor())}")
    con.execute("CREATE VIEW results AS SELECT * FROM current")
    return con


def _legacy_dataset(out: str):
    dt = legacy_table(out)
    return dt.to_pyarrow_dataset() if dt is not None else None


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
    total = con.execute("SELECT count(*) FROM history").fetchone()[0]
    current = con.execute("SELECT count(*) FROM current").fetchone()[0]
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
        "FROM log GROUP BY run_id ORDER BY first_at DESC LIMIT 5").fetchall()
    if runs:
        lines.append("  latest runs (rows written, first commit UTC):")
        lines += [f"    {run} {n} {at}" for run, n, at in runs]
    return "\n".join(lines)
