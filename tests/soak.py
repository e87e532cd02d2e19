"""Thirty nights of faults: the nightly promise checked end to end, from the outside.

A lake of small images (most on local disk, a tenth on S3) changes every night the way
real lakes do: new images, changed bytes, deletions, renames, truncated and corrupt files,
a HEIC and an AVIF, sometimes an image that kills the worker reading it, sometimes a
directory nobody may read. Every night `lakelens annotate --prune --index` (tiny embedder)
runs over it on a two-node `ray.cluster_utils.Cluster`, and every fifth night (and on the
nights that fault it) an all-five-tasks run annotates a subset into a table on S3. Each
night also suffers one fault drawn from FAULTS, injected for real (SIGKILL, SIGSTOP, a
node removed, S3 behind a proxy that answers 503 or resets connections). Meanwhile a
`lakelens serve` answers a steady stream of queries on loopback.

After each night the invariants are checked from the outside: the tables are read with
deltalake + DuckDB (the current view written here from the README's definition), the index
with FAISS and pyarrow from its files, the service over HTTP. Nothing here calls lakelens's
own reading code. Each violation is recorded with the night and what was seen.

Run it with `python benchmarks/soak.py --nights N --seed S` (JSON on the last line);
tests/test_soak.py runs three nights in the default suite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger("soak")

REPO = Path(__file__).resolve().parent.parent
BUCKET = "soak"
FAULTS = ("driver_kill", "actor_kill", "reader_kill", "node_removed", "concurrent", "index_kill",
          "s3_faults", "lease_takeover")
POISON = "-poison.png"  # a file name ending so marks an image that kills its reader
BAD_STAGES = {"trunc": {"decode"}, "corrupt": {"decode", "read"}}
LEASE_S = 6.0


def poison_hook() -> None:
    """A Ray worker setup hook (given by import path through the job config): a worker
    that reads an image named *-poison.png SIGKILLs itself, as a decoder's segfault would.
    Nothing in lakelens knows about it."""
    from pipelines.annotate import read

    real = read.read_with_retries

    def read_or_die(uri: str, *args, **kwargs):
        if uri.endswith(POISON):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(uri, *args, **kwargs)

    read.read_with_retries = read_or_die


@dataclass(frozen=True)
class SoakConfig:
    work: Path
    nights: int = 30
    seed: int = 0
    images: int = 2000
    s3_share: float = 0.1
    five_images: int = 60
    new_per_night: tuple[int, int] = (15, 40)
    run_timeout_s: float = 600.0


# --- S3 behind a fault-injecting proxy -------------------------------------------------------

class FaultProxy:
    """A TCP proxy to the S3 server: with probability `rate` a connection is answered
    `503 SlowDown` or reset; otherwise bytes flow both ways untouched."""

    def __init__(self, upstream: tuple[str, int], seed: int):
        self.upstream, self.rate, self.rng = upstream, 0.0, random.Random(seed)
        self.counts: Counter = Counter()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        draw = self.rng.random()
        with contextlib.suppress(OSError), conn:
            if draw < self.rate / 2:
                self.counts["503"] += 1
                conn.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>")
                conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                return
            if draw < self.rate:
                self.counts["reset"] += 1
                conn.recv(1024)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return
            self.counts["passed"] += 1
            with socket.create_connection(self.upstream) as up:
                pair = {conn: up, up: conn}
                while True:
                    ready, _, _ = select.select(list(pair), [], [], 60)
                    if not ready:
                        return
                    for s in ready:
                        data = s.recv(65536)
                        if not data:
                            return
                        pair[s].sendall(data)


# --- the lake ---------------------------------------------------------------------------------

def scene(rng: np.random.Generator, fmt: str) -> bytes:
    """A small image of a few random shapes on noise."""
    from PIL import Image, ImageDraw

    w, h = 64, 48
    base = rng.integers(0, 255, 3)
    pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = int(rng.integers(0, w - 12)), int(rng.integers(0, h - 12))
        box = (x0, y0, x0 + int(rng.integers(8, 30)), y0 + int(rng.integers(8, 24)))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    buf = io.BytesIO()
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    img.save(buf, format=fmt, **({"quality": 90} if fmt in ("JPEG", "AVIF", "HEIF") else {}))
    return buf.getvalue()


class Lake:
    """The lake's truth, kept by the soak as it changes it: uri -> (kind, sha256 of bytes)."""

    def __init__(self, root: Path, s3, rng: np.random.Generator):
        self.root, self.s3, self.rng = root, s3, rng
        self.files: dict[str, tuple[str, str]] = {}
        self.counter = 0
        self.locked = False  # root/locked/ unreadable tonight
        self.dirs = [f"d{i:02d}" for i in range(10)]

    def s3_uri(self, name: str) -> str:
        return f"s3://{BUCKET}/lake/{name}"

    def _name(self, ext: str, tag: str = "img") -> str:
        self.counter += 1
        return f"{tag}-{self.counter:06d}{ext}"

    def put(self, where: str, data: bytes, name: str, kind: str = "good") -> str:
        """where: 'local/<dir>' or 's3'."""
        if where == "s3":
            uri = self.s3_uri(name)
            self.s3.put_object(Bucket=BUCKET, Key=f"lake/{name}", Body=data)
        else:
            path = self.root / where.split("/", 1)[1] / name
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.rename(path)  # a reader never sees half a file (the lake's writers do the same)
            uri = str(path)
        self.files[uri] = (kind, hashlib.sha256(data).hexdigest())
        return uri

    def where(self) -> str:
        r = self.rng.random()
        if r < 0.1:
            return "s3"
        if r < 0.15:
            return "local/five"
        return f"local/{self.dirs[int(self.rng.integers(len(self.dirs)))]}"

    def add_good(self, n: int, where: str | None = None) -> list[str]:
        out = []
        for _ in range(n):
            fmt = "PNG" if self.rng.random() < 0.2 else "JPEG"
            out.append(self.put(where or self.where(), scene(self.rng, fmt),
                                self._name(".png" if fmt == "PNG" else ".jpg")))
        return out

    def movable(self) -> list[str]:
        """Good images outside the locked directory."""
        return sorted(u for u, (k, _) in self.files.items()
                      if k == "good" and "/locked/" not in u)

    def pick(self, n: int) -> list[str]:
        pool = self.movable()
        idx = self.rng.choice(len(pool), size=min(n, len(pool)), replace=False)
        return [pool[i] for i in idx]

    def change(self, uri: str) -> None:
        fmt = "PNG" if uri.endswith(".png") else "JPEG"
        data = scene(self.rng, fmt)
        if uri.startswith("s3://"):
            self.s3.put_object(Bucket=BUCKET, Key=uri.split(f"{BUCKET}/", 1)[1], Body=data)
        else:
            time.sleep(0.002)  # a new mtime even on coarse clocks
            tmp = Path(uri + ".tmp")
            tmp.write_bytes(data)
            tmp.rename(uri)
        self.files[uri] = ("good", hashlib.sha256(data).hexdigest())

    def delete(self, uri: str) -> None:
        if uri.startswith("s3://"):
            self.s3.delete_object(Bucket=BUCKET, Key=uri.split(f"{BUCKET}/", 1)[1])
        else:
            os.unlink(uri)
        del self.files[uri]

    def rename(self, uri: str) -> str:
        ext = Path(uri).suffix
        if uri.startswith("s3://"):
            key = uri.split(f"{BUCKET}/", 1)[1]
            new = self._name(ext)
            self.s3.copy_object(Bucket=BUCKET, Key=f"lake/{new}", CopySource={"Bucket": BUCKET, "Key": key})
            self.s3.delete_object(Bucket=BUCKET, Key=key)
            target = self.s3_uri(new)
        else:
            target = str(Path(uri).with_name(self._name(ext)))
            os.rename(uri, target)
        self.files[target] = self.files.pop(uri)
        return target

    def plant_bad(self) -> list[str]:
        good = scene(self.rng, "JPEG")
        garbage = b"\xff\xd8\xff\xe0" + self.rng.bytes(900)
        where = self.where()
        return [self.put(where, good[: len(good) // 2], self._name(".jpg", "trunc"), "trunc"),
                self.put(self.where(), garbage, self._name(".jpg", "corrupt"), "corrupt")]

    def plant_formats(self) -> list[str]:
        where = f"local/{self.dirs[int(self.rng.integers(len(self.dirs)))]}"
        return [self.put(where, scene(self.rng, "HEIF"), self._name(".heic")),
                self.put(where, scene(self.rng, "AVIF"), self._name(".avif"))]

    def plant_poison(self) -> str:
        where = f"local/{self.dirs[int(self.rng.integers(len(self.dirs)))]}"
        self.counter += 1
        return self.put(where, scene(self.rng, "PNG"), f"x-{self.counter:06d}{POISON}", "poison")

    def set_locked(self, locked: bool) -> None:
        path = self.root / "locked"
        os.chmod(path, 0o000 if locked else 0o755)
        self.locked = locked

    def expected(self, prefixes: tuple[str, ...]) -> dict[str, tuple[str, str]]:
        return {u: v for u, v in self.files.items() if u.startswith(prefixes)}


def can_lock_out(path: Path) -> bool:
    """Whether chmod 000 stops this process's children reading a directory (not as full root)."""
    probe = path / ".probe"
    probe.mkdir(exist_ok=True)
    os.chmod(probe, 0)
    try:
        os.listdir(probe)
        return False
    except PermissionError:
        return True
    finally:
        os.chmod(probe, 0o755)
        probe.rmdir()


# --- processes --------------------------------------------------------------------------------

def lakelens_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def ray_workers(marker: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd.startswith("ray::") and marker in cmd:
                found.append(p)
    return found


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            return -999

    def tail(self, n: int = 3) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        return " | ".join(lines[-n:])

    def failed_with_traceback(self) -> bool:
        """Whether the command ended on a traceback (not one line). Ray Data's own log of a
        worker crash it handled (a poison image) prints one too, earlier: not counted."""
        lines = self.log.read_text(errors="replace").splitlines()
        return "Traceback (most recent call last)" in "\n".join(lines[-40:]) and not (
            lines and lines[-1].startswith("lakelens: error:"))


@dataclass
class Stats:
    faults: Counter = field(default_factory=Counter)
    missed: Counter = field(default_factory=Counter)  # a fault drawn that found nothing to hit
    violations: list[dict] = field(default_factory=list)
    runs: Counter = field(default_factory=Counter)
    failed_runs: list[str] = field(default_factory=list)
    night_s: list[float] = field(default_factory=list)


class Soak:
    def __init__(self, cfg: SoakConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.stats = Stats()
        self.work = cfg.work
        self.out, self.index = self.work / "out", self.work / "index"
        self.out5 = f"s3://{BUCKET}/out5"
        self.night = 0
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.s3_fault_night = False
        self.five_ran = False

    # -- the world --------------------------------------------------------------------------
    def __enter__(self) -> Soak:
        self._stack = contextlib.ExitStack()
        self._stack.__enter__()
        from tests.helpers import moto_s3

        env = self._stack.enter_context(moto_s3(self.work))
        import boto3

        self.s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                               aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                               aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        self.s3.create_bucket(Bucket=BUCKET)
        port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
        self.proxy = FaultProxy(("127.0.0.1", port), self.cfg.seed)
        self._stack.callback(self.proxy.close)
        self.storage = {k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        self.storage.update(AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true")
        self.env = {**os.environ, **env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.proxy.port}",
                    "LAKELENS_CACHE": str(self.work / "cache"), "PYTHONPATH": str(REPO),
                    "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(
                        {"runtime_env": {"worker_process_setup_hook": "tests.soak.poison_hook"}})}
        self.env.pop("RAY_ADDRESS", None)
        from ray.cluster_utils import Cluster

        saved = os.environ.pop("RAY_ADDRESS", None)
        # the nodes' workers see S3 through the proxy and import the poison hook from here
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("AWS_")})
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        from tests.helpers import free_port

        # the head's dashboard agent on a port of its own: soaks (and tests) may run side by side
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "dashboard_agent_listen_port": free_port(),
            "object_store_memory": 300 * 2**20})
        self.worker = self.cluster.add_node(num_cpus=2, object_store_memory=300 * 2**20)
        self.cluster.wait_for_nodes()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
        self._stack.callback(self.cluster.shutdown)
        self.lake = Lake(self.work / "lake", self.s3, self.rng)
        (self.work / "lake" / "locked").mkdir(parents=True)
        self.lockable = can_lock_out(self.work / "lake")
        self.service: subprocess.Popen | None = None
        self.client_stop = threading.Event()
        self.client_counts: Counter = Counter()
        self.client_failures: list[str] = []
        self.known_ids: list[str] = []
        self._stack.callback(self._stop_service)
        return self

    def __exit__(self, *exc) -> None:
        if self.lake.locked:
            self.lake.set_locked(False)
        self._stack.__exit__(*exc)

    # -- runs -------------------------------------------------------------------------------
    def start(self, name: str, args: list[str]) -> Proc:
        self.stats.runs[name.split("-")[0]] += 1
        log = self.logs / f"n{self.night:02d}-{name}-{self.stats.runs[name.split('-')[0]]}.log"
        popen = subprocess.Popen(lakelens_cmd(*args), cwd=REPO, env=self.env, stdout=open(log, "w"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
        return Proc(name, popen, log)

    def main_args(self, index: bool = True) -> list[str]:
        return ["annotate", str(self.work / "lake"), f"s3://{BUCKET}/lake", "--out", str(self.out),
                "--tasks", "embed", "--arch", "embed=tiny", "--weights", "random", "--prune",
                "--chunk-size", "12", "--batch-size", "8", "--address", self.cluster.address,
                *(["--index", str(self.index)] if index else [])]

    def five_args(self) -> list[str]:
        return ["annotate", str(self.work / "lake" / "five"), "--out", self.out5,
                "--tasks", "detect,segment,pose,semantic,embed", "--arch", "detect=fasterrcnn_tiny",
                "--arch", "segment=maskrcnn_tiny", "--arch", "pose=keypointrcnn_tiny",
                "--arch", "semantic=unet_tiny", "--arch", "embed=tiny", "--weights", "random",
                "--score-threshold", "0.3", "--prune", "--chunk-size", "10", "--batch-size", "4",
                "--lease-s", str(LEASE_S), "--address", self.cluster.address]

    def finish(self, proc: Proc, *, ok_codes: tuple[int, ...] = (0,)) -> int:
        rc = proc.wait(self.cfg.run_timeout_s)
        if rc not in ok_codes:
            self.stats.failed_runs.append(f"night {self.night} {proc.name}: rc {rc}: {proc.tail()}")
        if rc not in (0, -999) and proc.failed_with_traceback():
            self.violate("traceback", f"{proc.name} failed with a traceback: {proc.tail(6)}")
        return rc

    def run_to_end(self, name: str, args: list[str]) -> int:
        """A command as the scheduler runs it: once, and once more if it failed."""
        rc = self.finish(self.start(name, args), ok_codes=(0, 1))
        if rc != 0:
            rc = self.finish(self.start(f"{name}-retry", args))
        return rc

    def log_version(self) -> int:
        from deltalake import DeltaTable

        try:
            return DeltaTable(str(self.out / "log")).version()
        except Exception:  # noqa: BLE001 - not created yet
            return -1

    def out5_commits(self) -> int:
        got = self.s3.list_objects_v2(Bucket=BUCKET, Prefix="out5/log/_delta_log/")
        return sum(1 for o in got.get("Contents", []) if o["Key"].endswith(".json"))

    def wait_until(self, proc: Proc, cond, timeout: float = 300) -> bool:
        deadline = time.monotonic() + timeout
        while proc.popen.poll() is None and time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.05)
        return False

    # -- faults -----------------------------------------------------------------------------
    def main_night(self, fault: str) -> None:
        if fault == "driver_kill":
            start = self.log_version()
            k = int(self.rng.integers(0, 3))  # after its lock's fence commit, or after chunk 1 or 2
            p = self.start("main", self.main_args())
            if self.wait_until(p, lambda: self.log_version() >= start + 1 + k):
                p.popen.kill()
                p.popen.wait()
                self.stats.faults[fault] += 1
            else:
                self.finish(p)
                self.stats.missed[fault] += 1
            self.run_to_end("main-rerun", self.main_args())
        elif fault in ("actor_kill", "reader_kill", "node_removed"):
            start = self.log_version()
            p = self.start("main", self.main_args())
            hit = False
            if self.wait_until(p, lambda: self.log_version() >= start + 2):
                if fault == "node_removed":
                    self.cluster.remove_node(self.worker, allow_graceful=False)
                    hit = True
                else:
                    marker = "FusedStage" if fault == "actor_kill" else "read_decode"
                    hit = self.wait_until(p, lambda: self._kill_one(marker), timeout=60)
            self.stats.faults[fault] += hit
            self.stats.missed[fault] += not hit
            if self.finish(p, ok_codes=(0, 1)) != 0:
                self.run_to_end("main-rerun", self.main_args())
            if fault == "node_removed" and hit:
                self.worker = self.cluster.add_node(num_cpus=2, object_store_memory=300 * 2**20)
                self.cluster.wait_for_nodes()
        elif fault == "concurrent":
            a, b = self.start("main-a", self.main_args()), self.start("main-b", self.main_args())
            rcs = [self.finish(a, ok_codes=(0, 1, 2)), self.finish(b, ok_codes=(0, 1, 2))]
            self.stats.faults[fault] += 1
            refused = [p for p, rc in zip((a, b), rcs, strict=True) if rc != 0]
            for p in refused:
                if "locked by run" not in p.tail(1):
                    self.violate("concurrent", f"{p.name} failed otherwise: {p.tail()}")
            if len(refused) == 2 or 0 not in rcs:
                self.violate("concurrent", "neither of two concurrent runs succeeded")
            if refused:  # the scheduler's retry
                self.run_to_end("main-rerun", self.main_args())
        elif fault == "index_kill":
            self.run_to_end("main", self.main_args(index=False))
            code = ("import sys, time\nfrom index import versions\n"
                    "def stop(*a):\n    print('WRITTEN', flush=True); time.sleep(600)\n"
                    "versions._switch_local = stop\nfrom pipelines.indexing import update\n"
                    f"update({str(self.index)!r}, {str(self.out)!r})\n")
            proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=self.env,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                    start_new_session=True)
            line = proc.stdout.readline().strip()
            proc.kill()
            proc.wait()
            hit = line == "WRITTEN"
            self.stats.faults[fault] += hit
            self.stats.missed[fault] += not hit
            self.run_to_end("index", ["index", "update", str(self.index), str(self.out)])
        else:  # s3_faults (the proxy is on) and lease_takeover (the S3 table's run) hit elsewhere
            self.run_to_end("main", self.main_args())

    def _kill_one(self, marker: str) -> bool:
        procs = ray_workers(marker)
        if not procs:
            return False
        with contextlib.suppress(OSError):
            os.kill(procs[0].pid, signal.SIGKILL)
            return True
        return False

    def five_night(self, fault: str) -> None:
        if fault != "lease_takeover":
            self.run_to_end("five", self.five_args())
            return
        before = self.out5_commits()
        a = self.start("five-a", self.five_args())
        if not self.wait_until(a, lambda: self.out5_commits() >= before + 1):  # its fence, no chunk yet
            self.finish(a)
            self.stats.missed[fault] += 1
            return
        os.kill(a.popen.pid, signal.SIGSTOP)
        time.sleep(LEASE_S + 2)
        b = self.start("five-b", self.five_args())
        rc_b = self.finish(b)
        os.kill(a.popen.pid, signal.SIGCONT)
        rc_a = self.finish(a, ok_codes=(0, 1, 2))  # refused (2: a one-line error) is its right end
        self.stats.faults[fault] += 1
        if rc_b != 0:
            self.run_to_end("five-retry", self.five_args())
        if rc_a == 0 or "taken over" not in a.tail(2):  # its chunks must be refused, in one line
            self.violate("lease", f"the stopped owner did not learn of its takeover: rc {rc_a}: {a.tail()}")

    # -- a night ----------------------------------------------------------------------------
    def mutate(self) -> dict:
        lake, rng = self.lake, self.rng
        if self.night == 0:
            n = self.cfg.images
            for i in range(n):
                r = i / n
                where = ("s3" if r < self.cfg.s3_share else
                         "local/five" if i % max(1, n // self.cfg.five_images) == 0 else
                         f"local/{lake.dirs[i % len(lake.dirs)]}")
                fmt = "PNG" if i % 5 == 0 else "JPEG"
                lake.put(where, scene(rng, fmt), lake._name(".png" if fmt == "PNG" else ".jpg"))
            lake.add_good(8, "local/locked")
            return {"new": n + 8}
        if lake.locked and rng.random() < 0.6:
            lake.set_locked(False)
        done = Counter()
        done["new"] += len(lake.add_good(int(rng.integers(*self.cfg.new_per_night))))
        for uri in lake.pick(int(rng.integers(3, 9))):
            lake.change(uri)
            done["changed"] += 1
        for uri in lake.pick(int(rng.integers(2, 7))):
            lake.delete(uri)
            done["deleted"] += 1
        for uri in lake.pick(int(rng.integers(1, 5))):
            lake.rename(uri)
            done["renamed"] += 1
        done["bad"] += len(lake.plant_bad())
        done["formats"] += len(lake.plant_formats())
        if self.night == 1 or rng.random() < 0.3:
            lake.plant_poison()
            done["poison"] += 1
        if self.lockable and not lake.locked and rng.random() < 0.2:
            if not lake.locked:
                lake.add_good(2, "local/locked")  # new, and unlisted while locked
            lake.set_locked(True)
            done["locked"] += 1
        return dict(done)

    def run_night(self, fault: str | None) -> dict:
        started, before = time.monotonic(), len(self.stats.violations)
        done = self.mutate()
        self.s3_fault_night = fault == "s3_faults"
        if self.s3_fault_night:
            self.proxy.rate = 0.08
            self.stats.faults[fault] += 1
        try:
            if fault is None:
                self.run_to_end("main", self.main_args())
            else:
                self.main_night(fault)
            self.five_ran = self.night % 5 == 0 or fault in ("s3_faults", "lease_takeover")
            if self.five_ran:
                self.five_night(fault or "")
        finally:
            self.proxy.rate = 0.0
        if self.service is None:
            self._start_service()
        self.check()
        found = len(self.stats.violations) - before
        self.stats.night_s.append(time.monotonic() - started)
        return {"night": self.night, "fault": fault, "mutations": done, "violations": found,
                "wall_s": round(time.monotonic() - started, 1)}

    def schedule(self) -> list[str | None]:
        faults: list[str | None] = [None]
        while len(faults) <= self.cfg.nights:
            faults.extend(str(f) for f in self.rng.permutation(FAULTS))
        return faults[: self.cfg.nights + 1]

    def run(self) -> dict:
        began = time.monotonic()
        nights = []
        stopped = None
        try:
            for night, fault in enumerate(self.schedule()):
                self.night = night
                result = self.run_night(fault)
                nights.append(result)
                logger.info("night %d (%s): %s, %d violations, %.0f s", self.night, fault,
                            result["mutations"], result["violations"], result["wall_s"])
        except (KeyboardInterrupt, SystemExit) as e:  # stopped: the nights so far still count
            stopped = f"stopped during night {self.night} ({type(e).__name__})"
            logger.warning("soak %s", stopped)
        self.client_stop.set()
        time.sleep(0.5)
        return {"benchmark": "soak", "seed": self.cfg.seed, "nights": len(nights) - 1,
                "nights_asked": self.cfg.nights, "stopped": stopped,
                "faults_by_night": [n["fault"] for n in nights[1:]],
                "images_at_end": len(self.lake.files), "lockable_dirs": self.lockable,
                "faults": dict(self.stats.faults), "faults_missed": dict(self.stats.missed),
                "runs": dict(self.stats.runs), "runs_failed": len(self.stats.failed_runs),
                "failed_runs": self.stats.failed_runs[:20],
                "proxy": dict(self.proxy.counts),
                "service_requests": sum(self.client_counts.values()),
                "service_by_status": {str(k): v for k, v in sorted(self.client_counts.items())},
                "service_failures": len(self.client_failures),
                "service_failure_examples": self.client_failures[:5],
                "violations": len(self.stats.violations),
                "violation_examples": self.stats.violations[:20],
                "night_s_median": round(float(np.median(self.stats.night_s[1:] or [0])), 1),
                "wall_s": round(time.monotonic() - began, 1)}

    def violate(self, kind: str, what: str) -> None:
        self.stats.violations.append({"night": self.night, "kind": kind, "what": what[:600]})
        logger.warning("night %d: VIOLATION %s: %s", self.night, kind, what[:600])

    # -- the service ------------------------------------------------------------------------
    def _start_service(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        log = open(self.logs / "serve.log", "w")
        self.service = subprocess.Popen(
            lakelens_cmd("serve", str(self.index), "--table", str(self.out), "--port", str(self.port),
                         "--reload-interval", "1"),
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self._get("/health")[0] == 200:
                    break
            time.sleep(0.3)
        threading.Thread(target=self._client, daemon=True).start()

    def _stop_service(self) -> None:
        self.client_stop.set()
        if self.service is not None:
            self.service.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.service.wait(timeout=20)

    def _get(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _client(self) -> None:
        """A steady stream of queries (about 10 a second) while the nights run."""
        rng = random.Random(self.cfg.seed)
        while not self.client_stop.is_set():
            ids = self.known_ids
            if ids:
                image_id = ids[rng.randrange(len(ids))]
                try:
                    status, body = self._get(f"/search?image_id={image_id}&k=5")
                    self.client_counts[status] += 1
                    if status >= 500:
                        self.client_failures.append(f"night {self.night}: {status} {body[:200]!r}")
                except OSError as e:
                    self.client_counts["error"] += 1
                    self.client_failures.append(f"night {self.night}: {type(e).__name__}: {e}")
            time.sleep(0.1)

    # -- invariants, from the outside ----------------------------------------------------------
    def current(self, uri: str, storage: dict | None = None):
        """The current view of a lakelens table, computed here: the latest row after the
        snapshot's floor per image, else its snapshot row; tombstones dropped."""
        import duckdb
        from deltalake import DeltaTable

        con = duckdb.connect()
        log = DeltaTable(f"{uri}/log", storage_options=storage).to_pyarrow_dataset()
        con.register("log", log)
        try:
            snap = DeltaTable(f"{uri}/current", storage_options=storage).to_pyarrow_dataset()
            con.register("snapshot", snap)
            floor = con.execute("SELECT coalesce(min(committed_in), -1) FROM snapshot "
                                "WHERE status = 'watermark'").fetchall()[0][0]
        except Exception:  # noqa: BLE001 - no snapshot yet
            con.execute("CREATE VIEW snapshot AS SELECT * FROM log WHERE false")
            floor = -1
        cols = ("image_id, uri, status, error_stage, error_type, error_retryable, content_hash, run_id, "
                "embedding")
        has_emb = "embedding" in log.schema.names
        if not has_emb:
            cols = cols.replace(", embedding", "")
        lcols = ", ".join(f"l.{c.strip()}" for c in cols.split(","))
        sql = (f"WITH keys AS (SELECT image_id, max(committed_in) AS c FROM log WHERE committed_in > {floor} "
               f"GROUP BY image_id) SELECT {cols} FROM snapshot s WHERE s.status IN ('ok', 'error') AND "
               f"s.image_id NOT IN (SELECT image_id FROM keys) UNION ALL SELECT {lcols} FROM log l "
               "JOIN keys k "
               f"ON l.image_id = k.image_id AND l.committed_in = k.c WHERE l.status IN ('ok', 'error')")
        table = con.execute(sql).to_arrow_table()
        rows_by_run = dict(con.execute("SELECT run_id, count(*) FROM log WHERE status IN ('ok', 'error') "
                                       "GROUP BY run_id").fetchall())
        return table, rows_by_run, DeltaTable(f"{uri}/log", storage_options=storage).version()

    def last_record(self, root: str, storage: dict | None) -> dict | None:
        import pyarrow.fs as pafs

        if root.startswith("s3://"):
            got = self.s3.list_objects_v2(Bucket=BUCKET, Prefix="out5/runs/")
            recs = [json.loads(self.s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read())
                    for o in got.get("Contents", []) if o["Key"].endswith(".json")]
        else:
            fs = pafs.LocalFileSystem()
            recs = [json.loads(Path(i.path).read_text()) for i in
                    fs.get_file_info(pafs.FileSelector(f"{root}/runs", allow_not_found=True))
                    if i.path.endswith(".json")]
        recs = [r for r in recs if r.get("status", "succeeded") == "succeeded"]
        return max(recs, key=lambda r: r["finished_at"]) if recs else None

    def check_table(self, name: str, uri: str, prefixes: tuple[str, ...], storage: dict | None):
        table, rows_by_run, version = self.current(uri, storage)
        record = self.last_record(uri, storage)
        unlisted = tuple(d.rstrip("/") + "/" for d in (record or {}).get("unlisted_dirs", []))
        expected = self.lake.expected(prefixes)
        by_uri: dict[str, list[dict]] = {}
        for row in table.select([c for c in table.column_names if c != "embedding"]).to_pylist():
            by_uri.setdefault(row["uri"], []).append(row)
        ids = table.column("image_id")
        if len(set(ids.to_pylist())) != len(ids):
            self.violate("duplicate", f"{name}: {len(ids)} current rows, {len(set(ids.to_pylist()))} images")
        for uri_, rows in by_uri.items():
            hidden = uri_.startswith(unlisted)
            if len(rows) > 1:
                self.violate("duplicate", f"{name}: {uri_} has {len(rows)} current rows")
            if uri_ not in expected and not hidden:
                self.violate("never listed", f"{name}: {uri_} has a current row but is not in the lake")
        for uri_, (kind, sha) in expected.items():
            rows = by_uri.get(uri_, [])
            if uri_.startswith(unlisted):
                continue  # kept as it was while its directory could not be listed
            if len(rows) != 1:
                self.violate("missing", f"{name}: {uri_} ({kind}) has {len(rows)} current rows")
                continue
            row = rows[0]
            if kind == "good":
                if row["status"] == "ok":
                    if row["content_hash"] != sha:
                        self.violate("stale", f"{name}: {uri_}'s row is of other bytes")
                elif not (row["error_retryable"] and row["error_stage"] == "read"
                          and (uri_.startswith("s3://") or name == "five")):
                    self.violate("error", f"{name}: good image {uri_}: {row['error_stage']}/"
                                          f"{row['error_type']}")
            elif kind == "poison":
                seen = (row["status"], row["error_stage"], row["error_type"])
                if seen != ("error", "crash", "WorkerCrashed"):
                    self.violate("stage", f"{name}: poison {uri_}: {row['status']} {row['error_stage']}/"
                                          f"{row['error_type']}")
            elif row["status"] != "error" or row["error_stage"] not in BAD_STAGES[kind]:
                self.violate("stage", f"{name}: {kind} {uri_}: {row['status']} {row['error_stage']}/"
                                      f"{row['error_type']}")
        if record is None:
            self.violate("record", f"{name}: no run record")
        else:
            c = record["counts"]
            listed = sum(1 for u in expected if not u.startswith(unlisted))
            if c["listed"] != listed:
                self.violate("record", f"{name}: record {record['run_id']} listed {c['listed']}, the lake "
                                       f"holds {listed} listable images")
            if c["annotated"] + c["errors"] != rows_by_run.get(record["run_id"], 0):
                self.violate("record", f"{name}: record {record['run_id']} counts "
                                       f"{c['annotated'] + c['errors']} rows, the log holds "
                                       f"{rows_by_run.get(record['run_id'], 0)}")
            if record["table_version"] != version:
                self.violate("record", f"{name}: record says version {record['table_version']}, log is at "
                                       f"{version}")
        return table

    def check(self) -> int:
        before = len(self.stats.violations)
        main = self.check_table("main", str(self.out), (str(self.work / "lake") + "/", f"s3://{BUCKET}/lake/"),
                                None)
        if self.five_ran:
            self.check_table("five", self.out5, (str(self.work / "lake" / "five") + "/",), self.storage)
        self.check_index(main)
        self.check_service(main)
        return len(self.stats.violations) - before

    def read_index(self):
        """The served index from its files: FAISS for vectors, pyarrow for ids, numpy for live bits."""
        import faiss
        import pyarrow.parquet as pq

        version = (self.index / "CURRENT").read_text().strip()
        vdir = self.index / version
        manifest = json.loads((vdir / "manifest.json").read_text())
        index, ids = None, []
        for seg in manifest["segments"]:
            sdir = self.index / seg["dir"]
            if index is None:
                index = faiss.read_index(str(sdir / "index.faiss"))
            else:
                vectors = np.fromfile(sdir / "vectors.f32", dtype=np.float32).reshape(-1, index.d)
                index.add(vectors)
            for f in seg["id_files"]:
                ids.extend(pq.read_table(sdir / f, columns=["image_id"]).column("image_id").to_pylist())
        n = index.ntotal
        bits = vdir / "live.bits"
        live = (np.unpackbits(np.fromfile(bits, np.uint8), count=n, bitorder="little").astype(bool)
                if bits.exists() else np.ones(n, bool))
        return index, ids, live

    def check_index(self, main) -> None:
        index, ids, live = self.read_index()
        if index.ntotal != len(ids):
            self.violate("index", f"{index.ntotal} vectors, {len(ids)} ids")
            return
        ok = main.filter(np.asarray(main.column("status").to_pylist()) == "ok")
        want = dict(zip(ok.column("image_id").to_pylist(), range(ok.num_rows), strict=True))
        live_ids = [ids[i] for i in np.flatnonzero(live)]
        if len(set(live_ids)) != len(live_ids):
            self.violate("index", f"{len(live_ids) - len(set(live_ids))} images live twice")
        extra, missing = set(live_ids) - set(want), set(want) - set(live_ids)
        if extra:
            self.violate("index", f"{len(extra)} live index rows are not current results, "
                                  f"e.g. {sorted(extra)[:3]}")
        if missing:
            self.violate("index", f"{len(missing)} current results are not in the index, "
                                  f"e.g. {sorted(missing)[:3]}")
        emb = np.asarray(ok.column("embedding").to_pylist(), dtype=np.float32)
        rows = np.flatnonzero(live)
        kept = [r for r in rows if ids[r] in want]  # live rows that are current results
        if kept:  # each holds its image's current vector (a Flat index stores them as they are)
            stored = index.reconstruct_n(0, index.ntotal)[kept]
            cur = emb[[want[ids[r]] for r in kept]]
            cos = (stored * cur).sum(1) / (np.linalg.norm(stored, axis=1) * np.linalg.norm(cur, axis=1)
                                           + 1e-12)
            bad = int((cos < 0.999).sum())
            if bad:
                self.violate("index", f"{bad} live rows hold another vector than their current result")
        if not len(emb):
            return
        scores, found = index.search(emb, 10)
        own = 0
        names = ok.column("image_id").to_pylist()
        for i, name in enumerate(names):
            hits = [(s, ids[j]) for s, j in zip(scores[i], found[i], strict=True) if j >= 0 and live[j]]
            if not hits:
                continue
            best = hits[0][0]
            tie = {h for s, h in hits if abs(s - best) <= 1e-4 * max(1.0, abs(best))}
            own += name in tie
        if own != len(names):
            self.violate("rank1", f"{len(names) - own} of {len(names)} current images do not find "
                                  f"themselves at rank 1")
        self.known_ids = names

    def check_service(self, main) -> None:
        if self.service is None:
            return
        want = (self.index / "CURRENT").read_text().strip()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, body = self._get("/stats")
            if status == 200 and json.loads(body)["index_version"] == want:
                break
            time.sleep(0.5)
        else:
            self.violate("service", f"the service did not reload {want} within 60 s")
            return
        ok = set(np.asarray(main.column("image_id"))[np.asarray(main.column("status").to_pylist()) == "ok"])
        sample = random.Random(self.night).sample(sorted(ok), min(15, len(ok)))
        for image_id in sample:
            status, body = self._get(f"/search?image_id={image_id}&k=10")
            if status != 200:
                self.violate("service", f"/search {image_id}: {status} {body[:200]!r}")
                continue
            got = {h["image_id"] for hits in json.loads(body)["results"] for h in hits}
            stale = got - ok
            if stale:
                self.violate("service", f"/search {image_id} returned non-current images {sorted(stale)[:3]}")


def run_soak(cfg: SoakConfig) -> dict:
    with Soak(cfg) as soak:
        return soak.run()


def clear(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_dir():
            os.chmod(p, 0o755)
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["FAULTS", "SoakConfig", "run_soak", "clear", "dataclasses"]
