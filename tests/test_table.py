"""The schema 4 table: append-only log + per-part snapshot, upkeep, erasure, migration of
a schema 3 table written by the previous lakelens, and the lock's fence in the table."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from models.errors import LakelensError
from pipelines.lake import results
from pipelines.lake.lock import acquire
from pipelines.lake.sources import image_id
from pipelines.lake.table import NeedsMigration, open_table
from pipelines.lake.upkeep import forget, migrate, run_upkeep
from tests.helpers import clustered_vectors, write_results

SCHEMA3 = Path(__file__).parent / "data" / "schema3"  # written by lakelens at schema 3 (git 0c696f9)


def ids_of(n: int, start: int = 0) -> list[str]:
    return [image_id(f"/lake/{i:06d}.jpg") for i in range(start, start + n)]


def files_under(path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in path.rglob("*.parquet") if "_delta_log" not in str(p)}


def current_ids(out: Path) -> list[str]:
    table = open_table(str(out)).current_table(["image_id"], status=None)
    return sorted(table.column("image_id").to_pylist())


def test_migrate_a_schema_3_table_in_place(tmp_path: Path) -> None:
    out = tmp_path / "old"
    shutil.copytree(SCHEMA3, out)
    with pytest.raises(NeedsMigration, match="lakelens migrate"):
        open_table(str(out))
    legacy = DeltaTable(str(out / "table")).to_pandas()
    want = legacy[legacy["is_current"]].sort_values("image_id")
    assert len(want) == 29 and len(legacy) == 35  # 5 changed images' old rows, 1 vanished
    done = migrate(str(out))
    assert done["rows"] == 29 and not done.get("already")
    table = open_table(str(out))
    got = table.current_table(["image_id", "uri", "status", "embedding", "reason"], status=None)
    got = got.sort_by("image_id")
    assert got.column("image_id").to_pylist() == want["image_id"].tolist()
    assert got.column("uri").to_pylist() == want["uri"].tolist()
    assert got.column("status").to_pylist() == want["status"].tolist()
    changed = {f"/lake/{i:03d}.png" for i in range(5)}
    for row in got.to_pylist():  # the changed images migrate with their newer rows
        if row["status"] == "ok":
            assert row["embedding"][1] == (0.5 if row["uri"] in changed else 0.0)
    assert set(got.column("reason").to_pylist()) == {"migrated"}
    # the old table is left as it was, as the history before the migration
    con = results.connect(str(out))
    assert con.execute("SELECT count(*) FROM history").fetchone()[0] == 35
    assert con.execute("SELECT count(*), count(DISTINCT image_id) FROM current").fetchone() == (29, 29)
    assert migrate(str(out))["already"]
    # and it takes new rows like any schema 4 table
    write_results(out, np.ones((2, 4), np.float32), ids=[want["image_id"].iloc[0], "f" * 32],
                  embedder=("tiny", "random:seed0"), run_id="after")
    assert len(current_ids(out)) == 30


def test_a_night_appends_and_upkeep_keeps_writes_within_twice_the_rows(tmp_path: Path) -> None:
    out = tmp_path / "t"
    n, dim = 3000, 32
    ids = ids_of(n)
    write_results(out, clustered_vectors(n, dim), ids=ids, run_id="night0")
    table = open_table(str(out))
    run_upkeep(table)
    rng = np.random.default_rng(0)
    rows_bytes = total_bytes = 0
    for night in range(1, 6):
        before = files_under(out)
        changed = [ids[i] for i in rng.choice(n, 30, replace=False)]  # 1% of the lake
        new = ids_of(30, start=n + 30 * night)
        write_results(out, clustered_vectors(60, dim, seed=night), ids=changed + new, run_id=f"night{night}")
        log_added = sum(s for p, s in files_under(out / "log").items() if p not in before)
        run_upkeep(open_table(str(out)))
        added = sum(s for p, s in files_under(out).items() if p not in before)
        assert not set(before) - set(files_under(out)), "a night deleted or rewrote a file"
        rows_bytes += log_added
        total_bytes += added
        assert len(current_ids(out)) == n + 30 * night
    assert total_bytes <= 2 * rows_bytes, (total_bytes, rows_bytes)


def test_parts_split_as_the_lake_grows_and_the_view_stays(tmp_path: Path) -> None:
    out = tmp_path / "t"
    ids = ids_of(2000)
    write_results(out, clustered_vectors(2000, 8), ids=ids)
    table = open_table(str(out))
    table.meta["max_part_rows"] = 60  # parts of 16: ~125 rows each, so every part splits
    before = current_ids(out)
    done = run_upkeep(table)
    assert done["splits"] == 16 and len(table.parts()) == 256
    assert current_ids(out) == before == sorted(ids)
    parts = table.parts()
    assert all(len(p) == 2 for p in parts) and parts == sorted(parts)
    write_results(out, clustered_vectors(10, 8), ids=ids[:10], run_id="b")  # after the split
    got = open_table(str(out)).current_table(["image_id", "run_id"])
    assert got.num_rows == 2000 and sum(r == "b" for r in got.column("run_id").to_pylist()) == 10


def test_forget_tombstones_and_removes_every_byte_of_the_rows(tmp_path: Path) -> None:
    out = tmp_path / "t"
    ids = ids_of(500)
    write_results(out, clustered_vectors(500, 8), ids=ids)
    run_upkeep(open_table(str(out)))
    write_results(out, clustered_vectors(20, 8), ids=ids[:20], run_id="b")  # a second row each
    gone = ids[10:15] + ids[100:105]
    (tmp_path / "ids.txt").write_text("\n".join(gone + ["0" * 32]) + "\n")  # one that is not there
    done = forget(str(out), ids_file=str(tmp_path / "ids.txt"))
    assert (done["asked"], done["forgotten"]) == (11, 10)
    assert done["upkeep"]["erased"] == 10 and done["upkeep"]["log_rows_deleted"] == 15
    assert set(gone).isdisjoint(current_ids(out)) and len(current_ids(out)) == 490
    # every Parquet file on disk (not only the current versions'): only tombstones remain
    for path in list((out / "log").rglob("*.parquet")) + list((out / "current").rglob("*.parquet")):
        t = pq.read_table(path, columns=["image_id", "status", "uri"]).to_pylist()
        left = [r for r in t if r["image_id"] in gone]
        assert all(r["status"] == "tombstone" and r["uri"] is None for r in left), path
    by_sql = forget(str(out), where="image_id < '1'")
    assert by_sql["forgotten"] == sum(i < "1" for i in set(ids) - set(gone)) > 0
    with pytest.raises(LakelensError, match="exactly one of"):
        forget(str(out))


def test_taking_the_lock_commits_its_epoch_and_fences_the_old_owner(tmp_path: Path) -> None:
    out = tmp_path / "t"
    write_results(out, clustered_vectors(10, 4), ids=ids_of(10))
    table = open_table(str(out))
    with acquire(str(out), "first") as lock:
        first = table.fence(lock.epoch, run_id="first")
    assert DeltaTable(str(out / "log")).transaction_version("lakelens.lock") == first
    shutil.rmtree(out / "_lakelens")  # the lock file's epoch is reset; the table's is not
    with acquire(str(out), "second") as lock:
        assert lock.epoch <= first
        second = open_table(str(out)).fence(lock.epoch, run_id="second")
    assert second == first + 1
    rows = open_table(str(out)).current_table()
    with pytest.raises(LakelensError, match="taken over by a newer run"):
        table.commit(rows, run_id="first", seq=1, epoch=first)  # the old owner, at once


def test_readers_sql_streams_and_needs_no_file_list(tmp_path: Path) -> None:
    out = tmp_path / "t"
    ids = ids_of(300)
    write_results(out, clustered_vectors(300, 8), ids=ids)
    run_upkeep(open_table(str(out)))
    write_results(out, clustered_vectors(30, 8), ids=ids[:30], run_id="b")
    con = results.connect(str(out))
    sql = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'current'").fetchone()[0]
    assert ".parquet" not in sql
    assert con.execute("SELECT count(*), count(DISTINCT image_id) FROM current").fetchone() == (300, 300)
    assert con.execute("SELECT count(*) FROM current WHERE run_id = 'b'").fetchone()[0] == 30
    assert con.execute(f"SELECT run_id FROM current WHERE image_id = '{ids[0]}'").fetchone()[0] == "b"
    assert con.execute("SELECT count(*) FROM history").fetchone()[0] == 330
    batches = list(open_table(str(out)).current(["image_id"], batch_rows=32))
    assert len(batches) > 1 and sum(b.num_rows for b in batches) == 300
    assert isinstance(batches[0], pa.RecordBatch)


def test_migrate_and_forget_commands_and_their_mistakes(tmp_path: Path) -> None:
    from index.store import open_index
    from pipelines.indexing import IndexBuildConfig, build
    from tests.test_cli import _one_line_error, lakelens

    out = tmp_path / "old"
    shutil.copytree(SCHEMA3, out)
    proc = lakelens("results", str(out))
    _one_line_error(proc, "lakelens migrate")
    proc = lakelens("migrate", str(out))
    assert proc.returncode == 0 and "29 current rows" in proc.stdout, proc.stderr[-2000:]
    build(IndexBuildConfig(results=str(out), out=str(tmp_path / "index")))
    assert len(open_index(tmp_path / "index")) == 27  # the ok rows with an embedding
    ids = current_ids(out)[:3]
    (tmp_path / "ids.txt").write_text("\n".join(ids))
    index_dir = str(tmp_path / "index")
    proc = lakelens("forget", str(out), "--ids", str(tmp_path / "ids.txt"), "--index", index_dir)
    assert proc.returncode == 0 and "3 of 3 images tombstoned" in proc.stdout, proc.stderr[-2000:]
    index = open_index(tmp_path / "index")
    assert not set(ids) & set(index.live_image_ids()) and index.index.ntotal == len(index) <= 27
    assert len([p for p in (tmp_path / "index").iterdir() if p.name.startswith("v")]) == 1
    missing = str(tmp_path / "nope.txt")
    _one_line_error(lakelens("forget", str(out), "--ids", missing), "cannot read image ids")
    _one_line_error(lakelens("forget", str(out), "--where", "nope = 1"), "--where failed")
    _one_line_error(lakelens("forget", str(out)), "one of the arguments --ids --where is required")
    _one_line_error(lakelens("migrate", str(tmp_path / "nowhere")), "does not exist")
