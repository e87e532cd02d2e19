"""`lakelens submit` and `lakelens jobs` against a real `ray start --head` on 127.0.0.1
(dashboard on a free port, token auth on with the test run's token)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from pipelines.cluster.submit import check_address, check_package, package_files
from tests.helpers import free_port, read_current
from tests.test_cli import _one_line_error, lakelens

RAY = str(Path(sys.executable).with_name("ray"))
TINY = ["--tasks", "embed", "--arch", "embed=tiny", "--weights", "random"]


def _kill_session(sid: int) -> None:
    """Every process of the head's session: `ray start --block` and all it started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        procs = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == sid:
                    procs.append(p)
                    p.send_signal(sig)
            except (psutil.Error, ProcessLookupError, PermissionError):
                pass
        psutil.wait_procs(procs, timeout=10)


def _start_head(log: Path) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on loopback in a session of its own; returns at once.

    Every port it listens on by name is a free one: the job agent's default (52365) is
    often held by another Ray on a shared machine, and then no job can be submitted."""
    port, dash, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node address 127.0.0.1
           # the job's `python` is the cluster's: here, this environment's
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--dashboard-agent-listen-port={agent}", "--num-cpus=2",
             "--disable-usage-stats", "--block"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{dash}"


@pytest.fixture(scope="module")
def starting_head(tmp_path_factory: pytest.TempPathFactory):
    """A real Ray head on loopback, just launched: its dashboard and job agent are still
    starting when the first test of the module gets it. Stopped in teardown."""
    log = tmp_path_factory.mktemp("head") / "ray-start.log"
    proc, address = _start_head(log)
    try:
        yield proc, address, log
    finally:
        _kill_session(proc.pid)


def test_submit_right_after_ray_start_waits_for_the_job_agent(starting_head, tmp_path: Path) -> None:
    """The first test of the module (file order): submit meets the head while it starts."""
    _, address, log = starting_head
    job = lakelens("submit", "--address", address, "--no-wait", "--", "results", str(tmp_path))
    output = job.stdout + job.stderr
    assert "No available agent" not in output and "cannot reach" not in output, output[-3000:]
    assert job.returncode == 0 and "submitted job" in job.stdout, output[-3000:] + log.read_text()[-2000:]
    assert f"waiting for the Ray job agent at {address}" in job.stderr, job.stderr[-2000:]
    assert job.stderr.count("waiting for the Ray job agent") == 1


def test_the_agent_wait_gives_up_with_one_line_after_its_budget(capsys: pytest.CaptureFixture) -> None:
    from models.errors import LakelensError
    from pipelines.cluster.submit import connect_when_ready

    closed = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(LakelensError) as e:
        connect_when_ready(closed, budget_s=2.0)
    took = time.monotonic() - start
    assert 2.0 <= took < 8, took
    message = str(e.value)
    assert "\n" not in message and closed in message and "2 s" in message, message
    assert capsys.readouterr().err.count(f"waiting for the Ray job agent at {closed}") == 1


@pytest.fixture(scope="module")
def head(starting_head) -> str:
    """The same head once its Jobs API answers."""
    proc, address, log = starting_head
    deadline = time.monotonic() + 90
    while True:
        probe = lakelens("jobs", "list", "--address", address)
        if probe.returncode == 0:
            return address
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start did not come up:\n{log.read_text()[-3000:]}\n"
                               f"{probe.stderr[-2000:]}")
        time.sleep(1)


@pytest.mark.slow  # ~22 s; a failing job on the cluster stays in the default run
def test_submit_annotate_runs_on_the_cluster_and_fills_the_table(head: str, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    for i in range(4):
        Image.new("RGB", (48, 32), (i * 60, 100, 50)).save(lake / f"{i}.jpg")
    out = tmp_path / "out"
    proc = lakelens("submit", "--address", head, "--", "annotate", str(lake), "--out", str(out),
                        *TINY, "--batch-size", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted job" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].endswith("SUCCEEDED")
    assert "4 annotated, 0 errors" in proc.stdout  # the job's own last lines reached the terminal
    table = read_current(out, "ok")
    assert table.num_rows == 4 and set(table["uri"].to_pylist()) == {str(p) for p in lake.iterdir()}
    job_id = proc.stdout.split("submitted job ", 1)[1].split()[0]
    listed = lakelens("jobs", "list", "--address", head)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    status = lakelens("jobs", "status", job_id, "--address", head)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = lakelens("jobs", "logs", job_id, "--address", head)
    assert "4 annotated, 0 errors" in logs.stdout


def test_a_failing_job_exits_non_zero_with_its_error_line(head: str, tmp_path: Path) -> None:
    proc = lakelens("submit", "--address", head, "--", "annotate", str(tmp_path), "--out",
                        str(tmp_path / "o"), "--tasks", "detect,nonsense")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lakelens: error:" in proc.stdout and "nonsense" in proc.stdout
    assert "FAILED" in proc.stdout.rstrip().splitlines()[-1]


@pytest.mark.slow
def test_jobs_stop_stops_a_running_job(head: str, tmp_path: Path) -> None:
    proc = lakelens("submit", "--address", head, "--no-wait", "--", "synth", str(tmp_path / "s"),
                        "--images", "5000", "--size", "1024")  # minutes of work
    assert proc.returncode == 0, proc.stderr[-2000:]
    job_id = proc.stdout.split("submitted job ", 1)[1].split()[0]
    deadline = time.monotonic() + 120
    while "RUNNING" not in (status := lakelens("jobs", "status", job_id, "--address", head)).stdout:
        assert time.monotonic() < deadline and "FAILED" not in status.stdout, status.stdout + status.stderr
        time.sleep(1)
    stopped = lakelens("jobs", "stop", job_id, "--address", head)
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert "STOPPED" in lakelens("jobs", "status", job_id, "--address", head).stdout


def test_unknown_job_and_unreachable_address_are_one_line_errors(head: str) -> None:
    _one_line_error(lakelens("jobs", "status", "raysubmit_nope", "--address", head), "no job")
    closed = f"http://127.0.0.1:{free_port()}"
    _one_line_error(lakelens("jobs", "list", "--address", closed), "cannot reach the Ray Jobs API")


@pytest.mark.parametrize(("address", "ok"), [
    ("http://127.0.0.1:8265", True), ("http://localhost:8265", True), ("http://[::1]:8265", True),
    ("https://ray.example.com", True), ("http://10.0.0.5:8265", False),
    ("http://ray.example.com:8265", False), ("ray://127.0.0.1:10001", False), ("127.0.0.1:8265", False),
])
def test_plain_http_off_this_machine_is_refused(address: str, ok: bool) -> None:
    if ok:
        assert check_address(address) == address
    else:
        with pytest.raises(Exception, match="refusing plain http|http\\(s\\) URL"):
            check_address(address)
    if address.startswith("http://10."):
        assert check_address(address, allow_insecure_http=True) == address


def test_the_package_leaves_out_secrets_outputs_and_venvs(tmp_path: Path) -> None:
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "cli.py").write_text("print()\n")
    for secret in (".env", "prod.pem", "aws_credentials.json", ".venv/lib/x.py", ".git/config",
                   "demo-out/table/part.parquet", "pipelines/__pycache__/cli.pyc", "weights.pt"):
        (tmp_path / secret).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / secret).write_text("x")
    assert [rel for _, rel in package_files(tmp_path)] == ["pipelines/cli.py"]
    with open(tmp_path / "pipelines" / "big.bin", "wb") as f:
        f.truncate(101 * 2**20)
    with pytest.raises(Exception, match=r"101 MiB.*largest pipelines \(101 MiB\)"):
        check_package(tmp_path)


def test_relative_data_paths_are_refused_before_anything_is_sent() -> None:
    from pipelines.cluster.submit import SubmitConfig

    with pytest.raises(Exception, match="--out 'out' is relative"):
        SubmitConfig(args=("annotate", "s3://b/lake", "--out", "out"))
    SubmitConfig(args=("annotate", "s3://b/lake", "--out", "s3://b/out"))  # fine
    SubmitConfig(args=("annotate", "/data/lake", "--out", "/data/out"))  # fine


def test_annotate_config_paths_are_absolute_on_the_driver(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.config import AnnotateConfig

    monkeypatch.chdir(tmp_path)
    cfg = AnnotateConfig(sources=("lake", "s3://b/lake"), out="out", index="ix")
    assert cfg.sources == (str(tmp_path / "lake"), "s3://b/lake")
    assert (cfg.out, cfg.index) == (str(tmp_path / "out"), str(tmp_path / "ix"))
