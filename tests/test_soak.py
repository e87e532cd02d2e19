"""The soak (tests/soak.py) through its real entry point, benchmarks/soak.py: three nights of
seeded faults in the default suite, thirty in the slow one. Each night's invariants are
checked from the outside (DuckDB over the Delta tables, FAISS over the index files, HTTP
against a running `lakelens serve`); a violation fails the test with what was seen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def soak(tmp_path: Path, *args: str, timeout: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "soak.py"), "--work",
                             str(tmp_path / "soak"), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the soak stops its cluster, S3 server and service on SIGTERM
        stdout, stderr = proc.communicate(timeout=120)
    lines = stdout.strip().splitlines()
    assert lines, stderr[-3000:]
    result = json.loads(lines[-1])
    assert result["violations"] == 0, json.dumps(result["violation_examples"], indent=1)
    assert proc.returncode == 0, stderr[-3000:]
    return result


def test_three_nights_of_faults_keep_every_promise(tmp_path: Path) -> None:
    result = soak(tmp_path, "--quick", "--seed", "7", timeout=1200)  # driver kill, S3 503s, lease takeover
    assert result["nights"] == 3
    hit = {kind for kind, n in result["faults"].items() if n}  # injected for real, not only drawn
    assert hit == {"driver_kill", "s3_faults", "lease_takeover"}, result
    assert result["service_failures"] == 0, result["service_failure_examples"]
    assert result["service_requests"] > 0


@pytest.mark.slow  # about 30 minutes on 2 cores
def test_thirty_nights_of_faults_keep_every_promise(tmp_path: Path) -> None:
    result = soak(tmp_path, "--nights", "30", "--seed", "0", timeout=7200)
    from tests.soak import FAULTS

    assert {kind for kind, n in result["faults"].items() if n} == set(FAULTS), result["faults"]
    assert result["service_failures"] == 0, result["service_failure_examples"]
