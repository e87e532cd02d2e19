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


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory):
    """A real Ray head on loopback; stopped in teardown whatever the tests did."""
    port, dash = free_port(), free_port()
    log = tmp_path_factory.mktemp("head") / "ray-start.log"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node address 127.0.0.1
           # the job's `python` is the cluster's: here, this environment's
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
             "--disable-usage-stats", "--block"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            probe = lakelens("jobs", "list", "--address", address)
            if probe.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start did not come up:\n{log.read_text()[-3000:]}\n"
                                   f"{probe.stderr[-2000:]}")
            time.sleep(1)
        yield address
    finally:
        _kill_session(proc.pid)


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
