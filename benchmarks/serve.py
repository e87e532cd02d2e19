"""`lakelens serve` under load: latency and throughput over HTTP against the same search
called in-process, and no failed request while a new index version is switched in.

1. Writes N clustered vectors (default 1,000,000 x 256) as a lake table and builds the
   `auto` index (IVF with an HNSW coarse quantizer, fast-scan PQ, fp16 re-rank).
2. Starts `lakelens serve` (--workers, default 1) in its own process on a free loopback port.
3. Vector queries (k=10, held-out vectors of the same clusters) at concurrency 1, 8 and
   32 for --duration seconds each: p50/p99 latency and throughput. Baselines in the same
   run, called in this process from as many threads: the service's search one query per
   call (Snapshot.search), and through the service's batcher (Engine.batcher); the ratio
   is the better of the two over HTTP, i.e. what HTTP costs.
4. Reload under load: at concurrency 8, a new index version is written and CURRENT
   switched; every request must succeed and the service must end on the new version.
5. Image queries: a second index whose embedder is `tiny` (seeded random weights); JPEG
   uploads of 640x480 at concurrency 1 and 8.

Targets (2 cores): vector p50 <= 5 ms and p99 <= 25 ms at concurrency 8; in-process /
HTTP throughput <= 1.5; image query p50 <= 150 ms. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from benchmarks.index import vectors, write_results  # noqa: E402

K = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--image-n", type=int, default=20_000, help="vectors in the image-query index")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--quick", action="store_true", help="CI sizes: 50,000 vectors, 2 s each")
    p.add_argument("--family", type=int, default=100)
    p.add_argument("--spread", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="`lakelens serve --workers`")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.image_n, args.duration = 50_000, 2_000, 2.0
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


def stats(latencies: list[float], wall: float, failed: int) -> dict:
    lat = np.asarray(latencies) * 1000
    return {"requests": len(lat), "failed": failed, "qps": round(len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else None}


class Connection:
    """One keep-alive HTTP/1.1 connection over asyncio streams: a load generator that costs
    far less CPU per request than a general client, so that on a small machine the
    figures are the service's, not the client's."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def http_load(url: str, make_request, concurrency: int, duration: float,
                    until: threading.Event | None = None) -> dict:
    """`concurrency` clients, each sending its next request when the last one answered,
    for `duration` seconds (and on until `until` is set, when given)."""
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    failed = 0
    versions: dict[str, int] = {}
    end = time.perf_counter() + duration

    async def worker(n: int) -> None:
        nonlocal failed
        conn, i = Connection(host, int(port)), n
        try:
            while time.perf_counter() < end or (until is not None and not until.is_set()):
                method, path, body, ctype = make_request(i)
                t = time.perf_counter()
                try:
                    status, data = await conn.request(method, path, body, ctype)
                    answer = json.loads(data) if status == 200 else None
                    ok = answer is not None and len(answer["results"][0]) == K
                except (OSError, ValueError, asyncio.IncompleteReadError):
                    ok, answer = False, None
                    conn.close()
                    conn = Connection(host, int(port))
                if ok:
                    latencies.append(time.perf_counter() - t)
                    v = answer["index_version"]
                    versions[v] = versions.get(v, 0) + 1
                else:
                    failed += 1
                i += concurrency
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    wall = time.perf_counter() - started
    return {**stats(latencies, wall, failed), "versions": versions}


def inprocess_load(search, queries: np.ndarray, concurrency: int, duration: float) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    end = time.perf_counter() + duration

    def worker(n: int) -> None:
        i, mine = n, []
        while time.perf_counter() < end:
            t = time.perf_counter()
            search(queries[i % len(queries)])
            mine.append(time.perf_counter() - t)
            i += concurrency
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats(latencies, time.perf_counter() - started, 0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(index_dir: Path, port: int, log: Path, workers: int = 1) -> subprocess.Popen:
    import httpx

    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", str(index_dir),
                                 "--port", str(port), "--reload-interval", "1",
                                 "--workers", str(workers)], stderr=err)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"lakelens serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    sys.exit("lakelens serve did not start within 600 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((640, 480)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import httpx

    from index import store
    from pipelines.indexing import IndexBuildConfig, build
    from pipelines.serve.engine import Engine, ServeConfig
    from pipelines.serve.facets import Filter

    result: dict = {"bench": "serve", "quick": args.quick, "n": args.n, "dim": args.dim, "k": K,
                    "cpus": os.cpu_count(), "duration_s": args.duration, "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="lakelens-serve-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_results(root / "results", args.n, args.dim, args)
        manifest = build(IndexBuildConfig(results=str(root / "results"), out=str(root / "index")))
        result.update(factory=manifest["factory"], recall_at_10=manifest["recall_at_10"],
                      setup_s=round(time.perf_counter() - t, 1))
        print(f"index: {manifest['factory']} recall@10 {manifest['recall_at_10']} "
              f"({result['setup_s']} s to write and build)", flush=True)
        fresh = np.concatenate([x for _, x in vectors(args.n + 2000, args.dim, args.seed, args.family,
                                                      args.spread, start=args.n, centres_of=args.n)])
        payloads = [json.dumps({"vector": v.tolist(), "k": K}).encode() for v in fresh]

        def vector_request(i: int):
            return "POST", "/search/vector", payloads[i % len(payloads)], "application/json"

        port = free_port()
        service = start_service(root / "index", port, root / "serve.log", args.workers)
        url = f"http://127.0.0.1:{port}"
        try:
            engine = Engine(ServeConfig(index=str(root / "index"), reload_s=0))
            snap = engine.current()
            none = Filter()
            result["vector"] = {}
            for c in args.concurrency:
                asyncio.run(http_load(url, vector_request, c, min(1.0, args.duration)))  # warm-up
                http = asyncio.run(http_load(url, vector_request, c, args.duration))
                http.pop("versions")
                local = inprocess_load(lambda v: snap.search(v, K, none, None), fresh, c, args.duration)
                batched = inprocess_load(
                    lambda v: engine.batcher.submit(snap, v[None], K, none, None).result(), fresh, c,
                    args.duration)
                best = max(local["qps"], batched["qps"])
                ratio = round(best / http["qps"], 3) if http["qps"] else None
                result["vector"][str(c)] = {"http": http, "in_process": local,
                                            "in_process_batched": batched, "in_process_over_http": ratio}
                print(f"vector c={c}: http {http}, in-process {local}, in-process batched {batched}, "
                      f"best in-process / http {ratio}", flush=True)

            # reload under load: a new version switched in while 8 clients query; the load
            # goes on until the service answers from the new version, then 2 s more
            before = httpx.get(f"{url}/health").json()["index_version"]
            switched = threading.Event()
            timing: dict = {}

            def switch() -> None:
                from index.versions import read_ids

                time.sleep(1.0)
                opened = store.open_index(root / "index")
                ids = read_ids(opened.path, opened.manifest)
                store.save(root / "index", opened.index, ids, opened.manifest)
                timing["switched"] = time.perf_counter()
                while httpx.get(f"{url}/health").json()["index_version"] == before:
                    time.sleep(0.05)
                timing["serving_new"] = time.perf_counter()
                time.sleep(2.0)
                switched.set()

            switcher = threading.Thread(target=switch)
            switcher.start()
            loaded = asyncio.run(http_load(url, vector_request, 8, 3.0, until=switched))
            switcher.join()
            after = httpx.get(f"{url}/health").json()["index_version"]
            result["reload"] = {"requests": loaded["requests"], "failed": loaded["failed"],
                                "before": before, "after": after, "served_by": loaded["versions"],
                                "p99_ms": loaded["p99_ms"],
                                "switch_to_serving_s": round(timing["serving_new"] - timing["switched"], 2)}
            print(f"reload under load: {result['reload']}", flush=True)
        finally:
            stop(service)

        # image queries: an index whose embedder is `tiny`
        img_args = argparse.Namespace(**{**vars(args), "seed": args.seed + 1})
        write_results(root / "img-results", args.image_n, 128, img_args)
        from pipelines.lake.table import open_table, save_meta

        table = open_table(str(root / "img-results"))
        table.meta["models"]["embed"].update(arch="tiny", weights_id="random:seed0")
        save_meta(table)
        build(IndexBuildConfig(results=str(root / "img-results"), out=str(root / "img-index")))
        boundary = "lakelens-bench-boundary"
        uploads = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                    f"filename=\"{i}.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
                   + jpeg(i) + f"\r\n--{boundary}--\r\n".encode() for i in range(64)]

        def image_request(i: int):
            return ("POST", f"/search/image?k={K}", uploads[i % 64],
                    f"multipart/form-data; boundary={boundary}")

        port = free_port()
        service = start_service(root / "img-index", port, root / "serve-img.log")
        url = f"http://127.0.0.1:{port}"
        try:
            result["image"] = {}
            for c in (1, 8):
                asyncio.run(http_load(url, image_request, c, min(1.0, args.duration)))
                http = asyncio.run(http_load(url, image_request, c, args.duration))
                http.pop("versions")
                result["image"][str(c)] = http
                print(f"image c={c}: {http}", flush=True)
        finally:
            stop(service)

    v8 = result["vector"].get("8", {})
    result["targets"] = {
        "vector_p50_ms_c8<=5": bool(v8) and v8["http"]["p50_ms"] <= 5,
        "vector_p99_ms_c8<=25": bool(v8) and v8["http"]["p99_ms"] <= 25,
        "in_process_over_http_c8<=1.5": bool(v8) and v8["in_process_over_http"] <= 1.5,
        "image_p50_ms_c1<=150": result["image"]["1"]["p50_ms"] <= 150,
        "reload_failed==0": result["reload"]["failed"] == 0
        and result["reload"]["after"] != result["reload"]["before"],
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
