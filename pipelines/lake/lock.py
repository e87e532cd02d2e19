"""One run per table at a time.

Local DIR: `fcntl.flock` on DIR/_lakelens/lock, a file that names the owner (run id,
host, pid, start time) and a lock epoch. The kernel releases the lock when its owner dies
(SIGKILL included), so a lock left by a killed run is simply taken over.

Object stores (s3://, gs://, ...): a lease object DIR/_lakelens/lease.json with an expiry,
renewed by a background thread. pyarrow's filesystems have no conditional put, so taking
the lease is best effort: write, wait, read back, and give up if another owner won. The
real fence against two writers is in the table: every commit carries the lock epoch as
a Delta app transaction, and a writer that sees a newer epoch stops (pipelines.lake.table).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import pyarrow.fs as pafs

from models.errors import LakelensError
from pipelines.lake.sources import is_remote

logger = logging.getLogger(__name__)

LOCK_DIR = "_lakelens"
SETTLE_S = 0.5  # remote lease: wait this long before reading our write back


class LockHeld(LakelensError):
    """Another run holds the table's lock."""


@dataclass(frozen=True)
class LockOwner:
    run_id: str
    host: str
    pid: int
    started_at: str
    epoch: int
    expires_at: str | None = None
    released: bool = False

    def describe(self) -> str:
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}, started {self.started_at})")


def _now() -> datetime:
    return datetime.now(UTC)


def _owner(run_id: str, epoch: int, expires: datetime | None = None) -> LockOwner:
    return LockOwner(run_id=run_id, host=socket.gethostname(), pid=os.getpid(),
                     started_at=_now().strftime("%Y-%m-%dT%H:%M:%SZ"), epoch=epoch,
                     expires_at=expires.isoformat() if expires else None)


def _parse(data: bytes) -> LockOwner | None:
    try:
        d = json.loads(data)
        return LockOwner(**{k: d[k] for k in LockOwner.__dataclass_fields__ if k in d})
    except (ValueError, TypeError, KeyError):
        return None


class TableLock:
    """A held lock; release() is idempotent; a context manager."""

    def __init__(self, owner: LockOwner):
        self.owner = owner

    @property
    def epoch(self) -> int:
        return self.owner.epoch

    def check(self) -> None:
        """Raise LockHeld if the lock was lost (a remote lease taken over)."""

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> TableLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class FileLock(TableLock):
    def __init__(self, path: str, run_id: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            previous = _parse(os.pread(fd, 65536, 0))
            os.close(fd)
            who = previous.describe() if previous else "another run"
            raise LockHeld(f"{os.path.dirname(os.path.dirname(path))} is locked by {who}; wait "
                           "for it to finish or stop it") from None
        previous = _parse(os.pread(fd, 65536, 0))
        if previous is not None and not previous.released:
            logger.warning("taking over the lock of %s, which is no longer running",
                           previous.describe())
        owner = _owner(run_id, (previous.epoch if previous else 0) + 1)
        self._write(fd, owner)
        super().__init__(owner)
        self._fd: int | None = fd

    @staticmethod
    def _write(fd: int, owner: LockOwner) -> None:
        data = json.dumps(asdict(owner)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self._write(self._fd, LockOwner(**{**asdict(self.owner), "released": True}))
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class LeaseLock(TableLock):
    """A lease object on a filesystem without locks (object stores)."""

    def __init__(self, fs: pafs.FileSystem, root: str, run_id: str, *, lease_s: float = 900.0,
                 settle_s: float = SETTLE_S):
        self.fs, self.path, self.lease_s = fs, f"{root}/{LOCK_DIR}/lease.json", lease_s
        fs.create_dir(f"{root}/{LOCK_DIR}", recursive=True)
        previous = self._read()
        if previous is not None and not previous.released and not self._expired(previous):
            raise LockHeld(f"{root} is locked by {previous.describe()} until "
                           f"{previous.expires_at}; wait for it to finish or stop it")
        if previous is not None and not previous.released:
            logger.warning("taking over the expired lease of %s", previous.describe())
        owner = _owner(run_id, (previous.epoch if previous else 0) + 1,
                       _now() + _seconds(lease_s))
        self._put(owner)
        time.sleep(settle_s)
        won = self._read()
        if won is None or (won.run_id, won.epoch) != (owner.run_id, owner.epoch):
            raise LockHeld(f"{root} was locked at the same moment by "
                           f"{won.describe() if won else 'another run'}; try again later")
        super().__init__(owner)
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, daemon=True)
        self._renewer.start()
        self._released = False

    def _read(self) -> LockOwner | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return _parse(f.read())
        except FileNotFoundError:
            return None

    def _put(self, owner: LockOwner) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps(asdict(owner)).encode())

    @staticmethod
    def _expired(owner: LockOwner) -> bool:
        return owner.expires_at is not None and datetime.fromisoformat(owner.expires_at) < _now()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.check()
                self.owner = LockOwner(**{**asdict(self.owner),
                                          "expires_at": (_now() + _seconds(self.lease_s)).isoformat()})
                self._put(self.owner)
            except LockHeld:
                logger.error("lost the lease on %s", self.path)
                return
            except OSError as e:
                logger.warning("cannot renew the lease %s: %s", self.path, e)

    def check(self) -> None:
        now = self._read()
        if now is None or (now.run_id, now.epoch) != (self.owner.run_id, self.owner.epoch):
            raise LockHeld(f"the lease {self.path} was taken over by "
                           f"{now.describe() if now else 'nobody (it was deleted)'}")

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._stop.set()
        try:
            self.check()
            self._put(LockOwner(**{**asdict(self.owner), "released": True}))
        except (LockHeld, OSError) as e:
            logger.warning("could not release the lease %s: %s", self.path, e)


def _seconds(s: float):
    from datetime import timedelta

    return timedelta(seconds=s)


def acquire(out: str, run_id: str, *, lease_s: float = 900.0) -> TableLock:
    """Take DIR's run lock or raise LockHeld naming its owner."""
    if is_remote(out):
        fs, root = pafs.FileSystem.from_uri(out)
        return LeaseLock(fs, root.rstrip("/"), run_id, lease_s=lease_s)
    root = os.path.abspath(out.removeprefix("file://"))
    return FileLock(os.path.join(root, LOCK_DIR, "lock"), run_id)


def read_owner(out: str) -> LockOwner | None:
    """Who holds (or last held) DIR's lock."""
    if is_remote(out):
        fs, root = pafs.FileSystem.from_uri(out)
        path = f"{root.rstrip('/')}/{LOCK_DIR}/lease.json"
        try:
            with fs.open_input_stream(path) as f:
                return _parse(f.read())
        except FileNotFoundError:
            return None
    path = os.path.join(os.path.abspath(out.removeprefix("file://")), LOCK_DIR, "lock")
    try:
        with open(path, "rb") as f:
            return _parse(f.read())
    except FileNotFoundError:
        return None
