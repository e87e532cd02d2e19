"""One run per table at a time.

Local DIR: `fcntl.flock` on DIR/_lakelens/lock, a file that names the owner (run id,
host, pid, start time) and a lock epoch. The kernel releases the lock when its owner dies
(SIGKILL included), so a lock left by a killed run is simply taken over.

Object stores: a lease object DIR/_lakelens/lease.json with an expiry, renewed by a
background thread. On s3:// every write of it is conditional: the lease is created with
`If-None-Match: *` and renewed, released or taken over (once expired or released) with
`If-Match: <ETag>` of the version read, so of two runs racing for it exactly one wins, and
a run whose lease was taken over learns it at its next renewal or check(). The endpoint and
credentials come from the standard AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
...), as for pyarrow's S3FileSystem. Other object stores (gs://, ...) are reached through
pyarrow, which has no conditional put: there taking the lease is best effort (write, wait,
read back) and a warning says so. Either way the last fence against two writers is in the
table: every commit carries the lock epoch as a Delta app transaction, and a writer that
sees a newer epoch stops (pipelines.lake.table).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import socket
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import pyarrow.fs as pafs

from index.objects import SETTLE_S, ConditionalObject, Conflict, FsObject, ObjectVersion, S3Object
from models.errors import LakelensError
from pipelines.lake.sources import is_remote

logger = logging.getLogger(__name__)

LOCK_DIR = "_lakelens"
LEASE_NAME = "lease.json"


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


def _encode(owner: LockOwner) -> bytes:
    return json.dumps(asdict(owner)).encode()


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
        data = _encode(owner)
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self._write(self._fd, dataclasses.replace(self.owner, released=True))
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# The lease object is a conditional object (index.objects); the names the lock has used.
LeaseConflict = Conflict
LeaseVersion = ObjectVersion
LeaseStore = ConditionalObject
S3LeaseStore = S3Object
FsLeaseStore = FsObject


class LeaseLock(TableLock):
    """A lease object on a filesystem without locks (object stores), kept by renewal."""

    def __init__(self, store: LeaseStore, root: str, run_id: str, *, lease_s: float = 900.0):
        self.store, self.lease_s = store, lease_s
        previous = store.read()
        held = _parse(previous.data) if previous is not None else None
        if held is not None and not held.released and not _expired(held):
            raise LockHeld(f"{root} is locked by {held.describe()} until {held.expires_at}; wait "
                           "for it to finish or stop it")
        if held is not None and not held.released:
            logger.warning("taking over the expired lease of %s", held.describe())
        elif previous is not None and held is None:
            logger.warning("replacing the unreadable lease %s", store.uri)
        owner = _owner(run_id, (held.epoch if held else 0) + 1, _now() + timedelta(seconds=lease_s))
        try:
            tag = store.create(_encode(owner)) if previous is None else store.replace(_encode(owner),
                                                                                       previous.tag)
        except LeaseConflict:
            won = store.read()
            who = _parse(won.data) if won is not None else None
            raise LockHeld(f"{root} was locked at the same moment by "
                           f"{who.describe() if who else 'another run'}; try again later") from None
        super().__init__(owner)
        self._tag = tag
        self._lost: str | None = None  # why the lease is no longer ours
        self._released = False
        self._mutex = threading.Lock()  # one lease write or check at a time
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="lakelens-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            with self._mutex:
                if self._stop.is_set() or self._lost is not None:
                    return
                owner = dataclasses.replace(
                    self.owner, expires_at=(_now() + timedelta(seconds=self.lease_s)).isoformat())
                try:
                    try:
                        self._tag = self.store.replace(_encode(owner), self._tag)
                        self.owner = owner
                    except LeaseConflict:
                        now = self.store.read()
                        if not self._still_ours(now):
                            logger.error("lost the lease: %s", self._lose(now))
                            return
                except OSError as e:
                    logger.warning("cannot renew the lease %s: %s", self.store.uri, e)

    def _still_ours(self, now: LeaseVersion | None) -> bool:
        """Whether NOW, a version we hold no tag for, is our own lease after all (a write
        of ours that landed but whose answer was lost); if so, keep it. A takeover always
        changes the run id or the epoch."""
        who = _parse(now.data) if now is not None else None
        mine = (self.owner.run_id, self.owner.epoch, self.owner.host, self.owner.pid)
        if who is None or who.released or (who.run_id, who.epoch, who.host, who.pid) != mine:
            return False
        self._tag, self.owner = now.tag, who
        return True

    def _lose(self, now: LeaseVersion | None) -> str:
        who = _parse(now.data) if now is not None else None
        self._lost = (f"the lease {self.store.uri} was deleted" if now is None else
                      f"the lease {self.store.uri} was taken over by "
                      f"{who.describe() if who else 'another writer (unreadable)'}")
        return self._lost

    def check(self) -> None:
        with self._mutex:
            if self._lost is not None:
                raise LockHeld(self._lost)
            now = self.store.read()
            if now is None or (now.tag != self._tag and not self._still_ours(now)):
                raise LockHeld(self._lose(now))

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._stop.set()
        with self._mutex:
            if self._lost is not None:
                logger.warning("did not release the lease: %s", self._lost)
                return
            try:
                try:
                    self._tag = self.store.replace(self._released_data(), self._tag)
                except LeaseConflict:
                    now = self.store.read()
                    if not self._still_ours(now):
                        logger.warning("did not release the lease: %s", self._lose(now))
                        return
                    self._tag = self.store.replace(self._released_data(), self._tag)
            except (LeaseConflict, OSError) as e:
                logger.warning("could not release the lease %s: %s", self.store.uri, e)

    def _released_data(self) -> bytes:
        return _encode(dataclasses.replace(self.owner, released=True))


def _expired(owner: LockOwner) -> bool:
    return owner.expires_at is not None and datetime.fromisoformat(owner.expires_at) < _now()


def lease_store(out: str) -> LeaseStore:
    """The lease object of the remote table directory OUT."""
    scheme, _, rest = out.partition("://")
    if scheme.lower() == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise LakelensError(f"no bucket in {out!r}; expected s3://BUCKET/PATH")
        key = "/".join(p for p in (prefix.strip("/"), LOCK_DIR, LEASE_NAME) if p)
        return S3LeaseStore(bucket, key)
    fs, root = pafs.FileSystem.from_uri(out)
    return FsLeaseStore(fs, f"{root.rstrip('/')}/{LOCK_DIR}/{LEASE_NAME}",
                        f"{out.rstrip('/')}/{LOCK_DIR}/{LEASE_NAME}")


def acquire(out: str, run_id: str, *, lease_s: float = 900.0) -> TableLock:
    """Take DIR's run lock or raise LockHeld naming its owner."""
    if is_remote(out):
        store = lease_store(out)
        if not store.atomic:
            logger.warning("%s has no conditional writes: the run lease %s is best effort, not atomic; "
                           "two runs started within %.1f s of each other may both proceed",
                           out, store.uri, SETTLE_S)
        return LeaseLock(store, out.rstrip("/"), run_id, lease_s=lease_s)
    root = os.path.abspath(out.removeprefix("file://"))
    return FileLock(os.path.join(root, LOCK_DIR, "lock"), run_id)


def read_owner(out: str) -> LockOwner | None:
    """Who holds (or last held) DIR's lock."""
    if is_remote(out):
        now = lease_store(out).read()
        return _parse(now.data) if now is not None else None
    path = os.path.join(os.path.abspath(out.removeprefix("file://")), LOCK_DIR, "lock")
    try:
        with open(path, "rb") as f:
            return _parse(f.read())
    except FileNotFoundError:
        return None
