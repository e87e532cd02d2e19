"""The nightly job on a real local Ray and real Delta tables: incremental runs, crashes of
the driver and of workers, the lock, the index kept in step, readers with no lakelens."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import psutil
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable
from PIL import Image

from index.store import open_index
from pipelines.annotate import run
from pipelines.config import AnnotateConfig
from pipelines.lake.lock import acquire
from tests.helpers import read_current
from tests.test_cli import _one_line_error, lakelens

REPO = Path(__file__).resolve().parent.parent
EMBED = {"tasks": ("embed",), "weights": {"embed": "random"}, "archs": {"embed": "tiny"}}


def write_images(folder: Path, n: int, *, start: int = 0, size: tuple[int, int] = (64, 48),
                 seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + start)
    paths = []
    for i in range(start, start + n):
        path = folder / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def assert_one_current_row_each(out: Path, uris: list[str]) -> None:
    current = read_current(out)
    got = current.column("uri").to_pylist()
    assert len(got) == len(set(got)), "an image has two current rows"
    assert sorted(got) == sorted(uris)


def table_version(out: Path) -> int:
    try:
        return DeltaTable(str(out / "log")).version()
    except Exception:
        return -1


@pytest.fixture(scope="module")
def nightly(ray_local, tmp_path_factory: pytest.TempPathFactory):
    """Night one over 40 images, with the index kept in step."""
    root = tmp_path_factory.mktemp("nightly")
    paths = write_images(root / "lake", 40)
    cfg = AnnotateConfig(sources=(str(root / "lake"),), out=str(root / "out"),
                         index=str(root / "index"), chunk_size=16, **EMBED)
    first = run(cfg)
    return root, paths, cfg, first


def test_night_one_annotates_everything_and_builds_the_index(nightly) -> None:
    root, paths, _, first = nightly
    assert (first.listed, first.new, first.annotated, first.errors) == (40, 40, 40, 0)
    assert first.index["summary"].startswith("built, 40 vectors")
    assert_one_current_row_each(root / "out", [str(p) for p in paths])
    assert len(open_index(root / "index")) == 40


def test_unchanged_lake_then_three_changed_and_five_new(nightly) -> None:
    root, paths, cfg, first = nightly
    started = time.perf_counter()
    same = run(cfg)
    assert (same.unchanged, same.annotated, same.errors, same.new, same.changed) == (40, 0, 0, 0, 0)
    assert "nothing to do" in same.index["summary"]  # checked every run, left alone
    assert time.perf_counter() - started < 20
    before = open_index(root / "index")
    old_vectors = {i: before.index.reconstruct(before.row(i)) for i in before.live_image_ids()[:3]}
    # Change three images' bytes (same names) and add five.
    changed = paths[:3]
    for n, p in enumerate(changed):
        Image.new("RGB", (64, 48), (255, 40 * n, 0)).save(p)
    added = write_images(root / "lake", 5, start=100, seed=7)
    night = run(cfg)
    assert (night.new, night.changed, night.unchanged, night.annotated) == (5, 3, 37, 8)
    assert_one_current_row_each(root / "out", [str(p) for p in paths + added])
    history = DeltaTable(str(root / "out" / "log")).to_pandas()
    again = history[history["reason"] == "changed"]  # appended; the first rows stay as they were
    assert sorted(again["uri"]) == sorted(str(p) for p in changed)
    assert (history.groupby("uri").size().loc[[str(p) for p in changed]] == 2).all()
    # The index follows: new images find themselves, changed ones are found by their new
    # vector only; the replaced vectors never come back.
    idx = open_index(root / "index")
    assert len(idx) == 45 and idx.manifest["table_version"] == night.table_version
    found = idx.search_images([str(p) for p in added + changed], 1)
    assert [u[0] for u in found.uris] == [str(p) for p in added + changed]
    for old in old_vectors.values():
        hits = idx.search(old, 45)
        assert len(hits.image_ids[0]) == 45  # every live image, no dead row among them
    assert idx.index.ntotal == 48  # 3 dead rows kept, excluded by the ID selector


def test_near_duplicate_edges_follow_the_nights_once(nightly) -> None:
    """annotate --index records the edges of the images each night indexed, once: night one
    searched its 40, the unchanged rerun nothing (no commit), the next night its 8."""
    from pipelines.dedup import APP
    from pipelines.lake.sources import image_id

    root, paths, _, first = nightly
    assert first.index["dedup"]["searched"] == 40
    dedup = DeltaTable(str(root / "out" / "dedup"))
    commits = [h for h in dedup.history() if h.get("operation") == "WRITE"]
    assert len(commits) == 2, commits  # night one, and the night of 5 new and 3 changed
    edges = dedup.to_pyarrow_table()
    keys = list(zip(edges.column("image_id").to_pylist(), edges.column("neighbour_id").to_pylist(),
                    edges.column("table_version").to_pylist(), strict=True))
    # once each (a changed image records its edges anew, at the version that indexed it)
    assert len(keys) == len(set(keys)) and not any(a == b for a, b, _ in keys)
    later = set(edges.filter(pc.not_equal(edges.column("table_version"), first.table_version))
                .column("image_id").to_pylist())
    night = {image_id(str(p)) for p in paths[:3]} | {image_id(str(p)) for p in
                                                      sorted((root / "lake").glob("001*.png"))}
    assert later and later <= night
    assert dedup.transaction_version(APP) == open_index(root / "index").manifest["table_version"]


def test_readers_need_only_a_filter(nightly) -> None:
    root, _, _, _ = nightly
    from pipelines.lake.results import current_sql

    # The README's SQL, over the two Delta tables read by deltalake alone (no lakelens).
    log = DeltaTable(str(root / "out" / "log")).to_pyarrow_dataset()  # noqa: F841 (DuckDB finds it)
    snapshot = DeltaTable(str(root / "out" / "current")).to_pyarrow_dataset()  # noqa: F841
    floor = "(SELECT coalesce(min(committed_in), -1) FROM snapshot WHERE status = 'watermark')"
    df = duckdb.sql(current_sql("log", "snapshot", floor)).df()
    assert len(df) == df["image_id"].nunique() >= 40
    assert sorted(df["uri"]) == sorted(read_current(root / "out", None).column("uri").to_pylist())
    proc = lakelens("results", str(root / "out"), "--sql",
                    "SELECT status, count(*) AS n FROM results GROUP BY status")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok" in proc.stdout and str(len(df)) in proc.stdout
    # A string filter over files that the merge rewrote (delta-rs writes those in Arrow
    # string_view, which a filter pushed into pyarrow's scanner cannot compare).
    proc = lakelens("results", str(root / "out"), "--sql",
                    "SELECT count(*) AS n_ok FROM results WHERE status = 'ok' AND uri LIKE '%.png'")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == str(int((df["status"] == "ok").sum()))
    summary = lakelens("results", str(root / "out"))
    assert summary.returncode == 0 and f"{len(df)} images" in summary.stdout
    proc = lakelens("results", str(root / "out"), "--out", str(root / "current.parquet"))
    assert proc.returncode == 0 and (root / "current.parquet").stat().st_size > 0
    bad = lakelens("results", str(root / "out"), "--sql", "SELECT nope FROM results")
    _one_line_error(bad, "--sql failed")


def test_compact_keeps_the_current_view(nightly) -> None:
    root, _, _, _ = nightly
    before = read_current(root / "out").sort_by("image_id")
    proc = lakelens("results", str(root / "out"), "--compact", "--retention-hours", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "snapshot parts rebuilt" in proc.stdout
    after = read_current(root / "out").sort_by("image_id")
    assert after.column("image_id").equals(before.column("image_id"))


def test_a_second_run_on_a_locked_dir_refuses_with_the_owner(nightly) -> None:
    root, _, cfg, _ = nightly
    with acquire(cfg.out, "night-in-progress"):
        proc = lakelens("annotate", str(root / "lake"), "--out", cfg.out, "--tasks", "embed",
                        "--weights", "random", "--arch", "embed=tiny", "--num-cpus", "1")
    _one_line_error(proc, "night-in-progress")


def test_an_error_rate_run_exits_non_zero_with_one_line(ray_local, tmp_path: Path, capsys) -> None:
    from pipelines.cli import main

    manifest = tmp_path / "missing.txt"
    manifest.write_text("".join(f"/nowhere/{i}.jpg\n" for i in range(30)))
    argv = ["annotate", str(manifest), "--out", str(tmp_path / "o"), "--tasks", "embed",
            "--weights", "random", "--arch", "embed=tiny"]
    rc = main(argv)  # in this process: it joins this module's Ray
    out, err = capsys.readouterr()
    _one_line_error(subprocess.CompletedProcess(argv, rc, out, err), "30 of 30 images failed")
    assert rc == 1 and "read/FileNotFoundError x30" in err
    assert "0 annotated, 30 errors" in out  # committed, and counted
    assert read_current(tmp_path / "o", "error").num_rows == 30


@pytest.mark.slow  # the soak's default nights kill drivers and workers too (tests/test_soak.py)
def test_sigkill_of_the_driver_then_rerun_resumes(ray_local, tmp_path: Path) -> None:
    paths = write_images(tmp_path / "lake", 80, size=(96, 72))
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    env = dict(os.environ)  # token auth on: conftest gives the run its own token
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "annotate", str(tmp_path / "lake"), "--out", str(out),
         "--tasks", "embed", "--weights", "random", "--arch", "embed=tiny", "--chunk-size", "4",
         "--batch-size", "4", "--address", address],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while table_version(out) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run, after at least one chunk committed
    proc.wait()
    committed = read_current(out).num_rows
    assert 4 <= committed < 80, committed
    rerun = run(AnnotateConfig(sources=(str(tmp_path / "lake"),), out=str(out), **EMBED))
    assert (rerun.unchanged, rerun.new, rerun.annotated) == (committed, 80 - committed,
                                                            80 - committed)
    assert_one_current_row_each(out, [str(p) for p in paths])
    history = DeltaTable(str(out / "log")).to_pandas()
    assert len(history) == 80  # nothing was annotated twice


def start_run(cfg: AnnotateConfig) -> tuple[threading.Thread, dict]:
    """annotate in a thread of this driver; its summary lands in the dict."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=run(cfg)), daemon=True)
    thread.start()
    return thread, result


def wait_for_commits(thread: threading.Thread, out: Path, version: int = 3) -> None:
    """Until the log reaches `version` (0 created, 1 the run's lock fence, then chunks)."""
    deadline = time.time() + 120
    while thread.is_alive() and table_version(out) < version and time.time() < deadline:
        time.sleep(0.02)
    assert thread.is_alive(), "the run ended before the fault could be injected"


def _ray_workers(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::") and marker in cmd:
            found.append(p)
    return found


@pytest.mark.slow  # the soak's default nights kill drivers and workers too (tests/test_soak.py)
def test_sigkill_of_workers_mid_run_loses_and_duplicates_nothing(ray_local, tmp_path: Path) -> None:
    paths = write_images(tmp_path / "lake", 160, size=(96, 72))
    out = tmp_path / "out"
    cfg = AnnotateConfig(sources=(str(tmp_path / "lake"),), out=str(out), chunk_size=8,
                         batch_size=4, **EMBED)
    worker, result = start_run(cfg)
    wait_for_commits(worker, out)
    killed: dict[str, int] = {}  # a model actor and a read/decode worker, each while busy
    deadline = time.time() + 60
    while worker.is_alive() and time.time() < deadline and len(killed) < 2:
        for marker in ("FusedStage", "read_decode"):
            procs = _ray_workers(marker)
            if procs and marker not in killed:
                os.kill(procs[0].pid, signal.SIGKILL)
                killed[marker] = procs[0].pid
        time.sleep(0.02)
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert "FusedStage" in killed, killed
    summary = result["summary"]
    assert summary.annotated + summary.errors == 160
    assert_one_current_row_each(out, [str(p) for p in paths])
    assert len(DeltaTable(str(out / "log")).to_pandas()) == 160


def test_actor_records_survive_a_kill_mid_write(tmp_path: Path, caplog) -> None:
    """The SIGKILL test once caught a record read half written: records are written then
    renamed, and a record that is unreadable anyway is skipped with a warning."""
    from pipelines.annotate.job import actor_stats
    from pipelines.annotate.stages import ActorStats

    stats = ActorStats(str(tmp_path / "actors"), ["embed"])
    stats.add("embed", 0.5, 4)
    stats.flush()
    assert [p.name.endswith(".json") for p in (tmp_path / "actors").iterdir()] == [True]
    (tmp_path / "actors" / "killed-1.json").write_bytes(b'{"host": "h", "tas')
    with caplog.at_level("WARNING"):
        records = actor_stats(str(tmp_path / "actors"))
    assert [r["tasks"]["embed"]["images"] for r in records] == [4]
    assert "killed-1.json" in caplog.text


def test_steady_rate_from_the_actors_clocks() -> None:
    """Known answers: 10 rows a second for 10 s is 10/s whichever actor did them; the
    per-actor histogram widens its bins as a run grows and keeps every row."""
    from pipelines.annotate.commit import steady_rate
    from pipelines.annotate.job import pool_steady_rate
    from pipelines.annotate.stages import MAX_DONE_BINS, ActorStats

    assert steady_rate({s: 10 for s in range(10)}) == 10.0
    assert steady_rate({5: 100}) is None
    a = {"tasks": {"embed": {}}, "done_bin_s": 1, "done": {str(s): 5 for s in range(0, 10)}}
    b = {"tasks": {"embed": {}}, "done_bin_s": 2, "done": {str(s): 10 for s in range(0, 10, 2)}}
    other = {"tasks": {"detect": {}}, "done_bin_s": 1, "done": {str(s): 99 for s in range(10)}}
    assert pool_steady_rate([a, b, other], "embed") == 10.0  # only the last pass counts
    stats = ActorStats(None, ["embed"])
    stats.record.update(done_bin_s=1, done={str(s): 1 for s in range(MAX_DONE_BINS)})
    stats.done(3)
    assert stats.record["done_bin_s"] == 2
    assert len(stats.record["done"]) <= MAX_DONE_BINS // 2 + 2
    assert sum(stats.record["done"].values()) == MAX_DONE_BINS + 3


def test_a_run_record_per_run(nightly) -> None:
    root, _, _, _ = nightly
    records = [json.loads(p.read_text()) for p in (root / "out" / "runs").glob("*.json")]
    assert len(records) >= 3
    for r in records:
        assert set(r["counts"]) >= {"listed", "new", "changed", "unchanged", "vanished",
                                    "annotated", "errors", "retried"}
        assert r["wall_s"] > 0
        # what each model actor did: every image it saw, with its busy time
        seen = sum(a["tasks"]["embed"]["images"] for a in r["actors"])
        assert seen == (r["counts"]["annotated"] + r["counts"]["errors"] if r["counts"]["annotated"] else 0)
        assert all(a["tasks"]["embed"]["busy_s"] > 0 for a in r["actors"] if a["tasks"]["embed"]["images"])


def test_prune_closes_vanished_images(nightly) -> None:
    root, paths, cfg, _ = nightly
    gone = paths[-2:]
    for p in gone:
        p.unlink()
    kept = run(cfg)
    assert kept.vanished == 2
    still = set(read_current(root / "out").column("uri").to_pylist())
    assert {str(p) for p in gone} <= still  # without --prune their rows stay current
    pruned = run(dataclasses.replace(cfg, prune=True))
    assert pruned.vanished == 2
    current = set(read_current(root / "out").column("uri").to_pylist())
    assert not current & {str(p) for p in gone}
    idx = open_index(root / "index")
    assert not set(idx.search(np.ones(idx.dim, np.float32), 100).uris[0]) & {str(p) for p in gone}


def test_transient_and_permanent_errors_are_told_apart() -> None:
    from pipelines.annotate.commit import retryable
    from pipelines.annotate.read import is_transient

    assert is_transient(TimeoutError("read timed out"))
    assert is_transient(ConnectionResetError("connection reset by peer"))
    assert is_transient(OSError("AWS Error SLOW_DOWN during GetObject: reduce your request rate"))
    assert is_transient(OSError("HTTP 503 Service Unavailable"))
    assert not is_transient(FileNotFoundError("no such file"))
    assert not is_transient(ValueError("cannot identify image file"))
    assert retryable("read", "TimeoutError", "timed out") is True
    assert retryable("read", "FileNotFoundError", "gone") is False
    assert retryable("decode", "TruncatedImageError", "truncated") is False
    assert retryable("crash", "WorkerCrashed", "died") is True
    assert retryable(None, None, None) is None


def test_a_lagging_index_catches_up_on_a_quiet_night(nightly) -> None:
    """A run that annotated without keeping the index in step (or whose index update
    failed after the last commit) leaves the index behind the table; the next run, with
    nothing new in the lake, still brings it up to date."""
    import dataclasses

    root, _, cfg, _ = nightly
    added = write_images(root / "lake", 2, start=300, seed=11)
    ahead = run(dataclasses.replace(cfg, index=None))
    assert ahead.annotated == 2
    assert open_index(root / "index").manifest["table_version"] < ahead.table_version
    quiet = run(cfg)
    assert (quiet.new, quiet.annotated) == (0, 0)
    assert quiet.index["summary"].startswith("2 vectors added"), quiet.index
    idx = open_index(root / "index")
    assert idx.manifest["table_version"] >= ahead.table_version
    assert [u[0] for u in idx.search_images([str(p) for p in added], 1).uris] == [str(p) for p in added]


def test_a_run_that_fails_after_committing_still_leaves_its_record(ray_local, tmp_path: Path) -> None:
    """The index's writer lock is held by another writer: the run commits its rows, then
    its index sync is refused. The record says so, with what the run committed."""
    from models.errors import LakelensError
    from pipelines.indexing import index_lock

    write_images(tmp_path / "lake", 12)
    out = tmp_path / "out"
    cfg = AnnotateConfig(sources=(str(tmp_path / "lake"),), out=str(out), index=str(tmp_path / "index"),
                         chunk_size=5, **EMBED)
    with index_lock(str(tmp_path / "index")), pytest.raises(LakelensError, match="lock"):
        run(cfg)
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert len(records) == 1, records
    r = records[0]
    assert r["status"] == "failed" and r["error"].startswith("LockHeld: ") and "locked by" in r["error"]
    assert r["counts"]["annotated"] + r["counts"]["errors"] == 12 and r["counts"]["new"] == 12
    assert r["chunks"] == 3 and r["table_version"] == table_version(out)
    assert read_current(out).num_rows == 12  # what it committed stays committed
    rerun = run(dataclasses.replace(cfg))  # the lock is free now: the index catches up
    done = json.loads((out / "runs" / f"{rerun.run_id}.json").read_text())
    assert done["status"] == "succeeded" and done["error"] is None and rerun.index
