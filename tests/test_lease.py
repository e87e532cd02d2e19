"""The run lease on object storage: conditional writes against a real S3 server (moto's, a
separate process on loopback), contended by separate OS processes. No Ray.

The contenders are spawned processes that import this module, so it imports nothing heavy
at the top (tests.helpers pulls in torch; the fixture imports it when it runs).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from pipelines.lake.lock import (
    LeaseLock,
    LockHeld,
    S3LeaseStore,
    acquire,
    lease_store,
    read_owner,
)

BUCKET = "leases"
ROUNDS = 20
KINDS = ("create", "takeover", "acquire")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """s3://BUCKET on a moto server; the AWS_* variables are set, so spawned children see them."""
    boto3 = pytest.importorskip("boto3")
    from tests.helpers import moto_s3

    with moto_s3(tmp_path_factory.mktemp("moto")) as env, pytest.MonkeyPatch.context() as monkey:
        for k, v in env.items():
            monkey.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"


class _Gated(S3LeaseStore):
    """An S3 lease whose first write waits for the other contender to have read the lease
    too: both then race in the conditional write itself, not in the read before it."""

    def __init__(self, out: str, together):
        base = lease_store(out)
        super().__init__(base.bucket, base.key, base.client)
        self.together, self.gated = together, True

    def _gate(self) -> None:
        if self.gated:
            self.gated = False
            self.together.wait(30)

    def create(self, data: bytes) -> str:
        self._gate()
        return super().create(data)

    def replace(self, data: bytes, tag: str) -> str:
        self._gate()
        return super().replace(data, tag)


def _contend(prefix: str, name: str, together, results) -> None:
    """One contender (a spawned process): each round, take three leases at the same moment
    as the other one: a new lease (If-None-Match), the released lease of the round before
    (If-Match), and one through acquire() as a run takes it."""
    for i in range(ROUNDS):
        for kind in KINDS:
            together.wait(30)
            try:
                if kind == "create":
                    lock = LeaseLock(_Gated(f"{prefix}/new{i}", together), f"{prefix}/new{i}", name,
                                     lease_s=60)
                elif kind == "takeover":
                    lock = LeaseLock(_Gated(f"{prefix}/shared", together), f"{prefix}/shared", name,
                                     lease_s=60)
                else:
                    lock = acquire(f"{prefix}/plain{i}", name, lease_s=60)
                outcome = ("won", lock.epoch)
            except LockHeld as e:
                lock, outcome = None, ("held", str(e))
            together.wait(30)  # both have tried before the winner lets go
            if lock is not None:
                lock.release()
            results.put((i, kind, name, *outcome))


def test_two_processes_racing_for_a_lease_exactly_one_wins_each_round(bucket: str) -> None:
    prefix = f"{bucket}/race"
    # the lease the takeover rounds fight over: released at epoch 1, so round i's winner gets i + 2
    LeaseLock(lease_store(f"{prefix}/shared"), prefix, "setup", lease_s=60).release()
    assert read_owner(f"{prefix}/shared").epoch == 1
    ctx = mp.get_context("spawn")
    together, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(prefix, name, together, results)) for name in ("a", "b")]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=120) for _ in range(2 * ROUNDS * len(KINDS))]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for i in range(ROUNDS):
        for kind in KINDS:
            both = {name: rest for j, k, name, *rest in got if (j, k) == (i, kind)}
            won = [(name, r[1]) for name, r in both.items() if r[0] == "won"]
            held = [r[1] for r in both.values() if r[0] == "held"]
            assert len(won) == 1 and len(held) == 1, (i, kind, both)
            winner, epoch = won[0]
            assert epoch == {"create": 1, "takeover": i + 2, "acquire": 1}[kind], (i, kind, both)
            if kind != "acquire":  # both read the lease free: the conditional write decided
                assert f"locked at the same moment by run {winner} " in held[0], held[0]
    last = read_owner(f"{prefix}/shared")
    assert last.released and last.epoch == ROUNDS + 1


def _hold_then_stop(out: str, lease_s: float, events, go) -> None:
    """Owner A (a spawned process): hold the lease, wait to be stopped and resumed, then
    report how it learnt that the lease was lost."""
    lock = acquire(out, "run-a", lease_s=lease_s)
    events.put(("held", lock.epoch))
    go.wait(60)  # set by the parent after SIGSTOP, B's takeover and SIGCONT
    deadline = time.monotonic() + 10
    while lock._lost is None and time.monotonic() < deadline:  # the renewer's first try after SIGCONT
        time.sleep(0.02)
    renew_failed = lock._lost is not None
    try:
        lock.check()
        events.put(("still held",))
    except LockHeld as e:
        events.put(("lost", str(e), renew_failed))
    lock.release()  # must leave B's lease alone
    events.put(("released",))


def test_an_owner_stopped_past_its_lease_is_taken_over_and_learns_it(bucket: str) -> None:
    out = f"{bucket}/stopped"
    ctx = mp.get_context("spawn")
    events, go = ctx.Queue(), ctx.Event()
    a = ctx.Process(target=_hold_then_stop, args=(out, 1.5, events, go))
    a.start()
    try:
        assert events.get(timeout=60) == ("held", 1)
        os.kill(a.pid, signal.SIGSTOP)
        time.sleep(0.2)  # a renewal already sent lands before we look
        held = read_owner(out)
        assert held.run_id == "run-a" and held.pid == a.pid
        with pytest.raises(LockHeld, match="is locked by run run-a"):  # stopped, not yet expired
            acquire(out, "run-b")
        time.sleep(max(0.0, (datetime.fromisoformat(held.expires_at) - datetime.now(UTC)).total_seconds())
                   + 0.2)
        b = acquire(out, "run-b", lease_s=60)
        assert b.epoch == held.epoch + 1 == 2
        os.kill(a.pid, signal.SIGCONT)
        go.set()
        kind, message, renew_failed = events.get(timeout=30)
        assert kind == "lost" and "was taken over by run run-b" in message, message
        assert renew_failed  # its renewal (If-Match on A's ETag) failed: it stopped renewing
        assert events.get(timeout=30) == ("released",)
        a.join(timeout=30)
        assert a.exitcode == 0
        b.check()
        now = read_owner(out)
        assert (now.run_id, now.epoch, now.released) == ("run-b", 2, False)  # A's release wrote nothing
        b.release()
        assert read_owner(out).released
    finally:
        if a.is_alive():
            os.kill(a.pid, signal.SIGCONT)
            a.kill()


def test_release_then_acquire_again_increments_the_epoch(bucket: str) -> None:
    out = f"{bucket}/again"
    assert read_owner(out) is None
    with acquire(out, "first", lease_s=30) as lock:
        assert lock.epoch == 1
        lock.check()
    first = read_owner(out)
    assert (first.run_id, first.epoch, first.released) == ("first", 1, True)
    with acquire(out, "second", lease_s=30) as lock:
        assert lock.epoch == 2
        lock.check()
        lock.release()
        lock.release()  # idempotent
    assert (read_owner(out).epoch, read_owner(out).released) == (2, True)
    assert acquire(out, "third", lease_s=30).epoch == 3  # left unreleased: expires by itself


def test_a_live_lease_is_refused_naming_its_owner(bucket: str) -> None:
    out = f"{bucket}/live"
    with acquire(out, "run-holder", lease_s=0.6) as lock:
        time.sleep(1.5)  # past the first expiry: the renewer keeps it alive
        with pytest.raises(LockHeld, match=rf"^{out} is locked by run run-holder \(host .*, pid "
                                           rf"{os.getpid()}, started .*\) until .*; wait for it") as e:
            acquire(out, "run-late")
        assert "\n" not in str(e.value)
        lock.check()  # the refused attempt wrote nothing
    assert read_owner(out).run_id == "run-holder"


def test_a_deleted_lease_is_lost(bucket: str) -> None:
    import boto3

    out = f"{bucket}/deleted"
    lock = acquire(out, "run-x", lease_s=30)
    store = lease_store(out)
    boto3.client("s3").delete_object(Bucket=store.bucket, Key=store.key)
    with pytest.raises(LockHeld, match="was deleted"):
        lock.check()
    lock.release()  # warns, writes nothing
    assert read_owner(out) is None


def test_other_object_stores_keep_a_best_effort_lease(caplog) -> None:
    """No conditional put through pyarrow (mock:// here, gs:// in life): the old lease, and a
    warning that says so (tests/test_lock.py covers its takeover on a local filesystem)."""
    with caplog.at_level(logging.WARNING, logger="pipelines.lake.lock"):
        lock = acquire("mock:///table", "run-m", lease_s=30)
    assert "best effort, not atomic" in caplog.text
    assert lock.epoch == 1
    lock.check()
    lock.release()


def test_a_renewal_that_landed_unanswered_keeps_the_lease(bucket: str) -> None:
    """A write of ours whose answer was lost (timeout) leaves a version we hold no ETag for:
    the same run and epoch, so still ours, not a takeover."""
    import dataclasses
    import json

    out = f"{bucket}/unanswered"
    lock = acquire(out, "run-y", lease_s=30)
    store = lease_store(out)
    landed = dataclasses.replace(lock.owner, expires_at=datetime.now(UTC).isoformat())
    store.client.put_object(Bucket=store.bucket, Key=store.key,
                            Body=json.dumps(dataclasses.asdict(landed)).encode())
    lock.check()
    lock.release()
    assert read_owner(out).released and read_owner(out).run_id == "run-y"
