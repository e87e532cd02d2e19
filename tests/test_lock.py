"""The run lock: real processes, real flock, a real SIGKILL; the lease on a plain filesystem."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipelines.lake.lock import FsLeaseStore, LeaseLock, LockHeld, acquire, read_owner

REPO = Path(__file__).resolve().parent.parent
HOLD = ("import sys, time\n"
        "from pipelines.lake.lock import acquire\n"
        "lock = acquire(sys.argv[1], 'holder-run')\n"
        "print(lock.epoch, flush=True)\n"
        "time.sleep(120)\n")


def hold_in_child(out: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    return proc, int(proc.stdout.readline())


def test_a_second_owner_is_refused_with_the_first_ones_name(tmp_path: Path) -> None:
    proc, _ = hold_in_child(tmp_path)
    try:
        with pytest.raises(LockHeld) as info:
            acquire(str(tmp_path), "second-run")
        message = str(info.value)
        assert "holder-run" in message and f"pid {proc.pid}" in message and "\n" not in message
        assert read_owner(str(tmp_path)).run_id == "holder-run"
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path: Path, caplog) -> None:
    proc, epoch = hold_in_child(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="pipelines.lake.lock"):
        with acquire(str(tmp_path), "next-night") as lock:
            assert lock.epoch == epoch + 1
    assert "taking over the lock of run holder-run" in caplog.text


def test_release_and_epochs(tmp_path: Path, caplog) -> None:
    epochs = []
    for n in range(3):
        with acquire(str(tmp_path), f"run-{n}") as lock:
            epochs.append(lock.epoch)
    assert epochs == sorted(epochs) and len(set(epochs)) == 3
    assert read_owner(str(tmp_path)).released
    with caplog.at_level(logging.WARNING, logger="pipelines.lake.lock"):
        acquire(str(tmp_path), "run-3").release()
    assert "taking over" not in caplog.text  # a clean release is not a takeover


def test_lease_refuses_a_live_owner_and_takes_over_an_expired_one(tmp_path: Path) -> None:
    def take(run_id: str) -> LeaseLock:  # the best-effort lease (no conditional writes)
        store = FsLeaseStore(pafs.LocalFileSystem(), f"{tmp_path}/_lakelens/lease.json", "lease",
                             settle_s=0.01)
        return LeaseLock(store, str(tmp_path), run_id, lease_s=60)

    first = take("lease-a")
    with pytest.raises(LockHeld, match="lease-a"):
        take("lease-b")
    first._stop.set()  # the owner stops renewing (it died); let its lease expire
    lease = tmp_path / "_lakelens" / "lease.json"
    data = json.loads(lease.read_text())
    data["expires_at"] = "2000-01-01T00:00:00+00:00"
    lease.write_text(json.dumps(data))
    second = take("lease-b")
    assert second.epoch == first.epoch + 1
    with pytest.raises(LockHeld, match="lease-b"):
        first.check()  # the old owner learns it lost the lease
    second.release()
    time.sleep(0.01)
    third = take("lease-c")
    assert third.epoch == second.epoch + 1
    third.release()
