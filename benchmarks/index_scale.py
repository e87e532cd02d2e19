"""The index at lake scale: the build in shards on Ray against the build in one process,
and a night's update against a full build, on N synthetic clustered vectors in a lake
table written through lakelens's commit path (no model).

For each size (default 1M and 10M x 128; --quick: 30k and 120k x 32):
1. a table of N images with clustered unit embeddings (families of ~100 near neighbours),
   committed in chunks of 100k, then its first upkeep (the snapshot) -- not timed;
2. (largest size) `index build` in one process (shards=0) and on a local Ray with 2 worker
   CPUs (--shards S), each in a fresh process: wall time, peak RSS of the driver and of
   every Ray worker process (sampled with psutil), held-out recall@10 of each;
3. a night adding 1% new images (committed, not timed), then `index update` in a fresh
   process: wall time and peak RSS, at each size, against the full build's wall time.

Ratios (targets in parentheses): sharded wall / one-process wall (<= 0.7 on 2 cores);
largest process's peak RSS / raw vector bytes N x dim x 4 (<= 0.6); recall@10 (>= 0.95);
update wall / full build wall (<= 0.05); update peak RSS at the largest size / at the
smallest (<= 1.2). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where "index" would name
# benchmarks/index.py instead of the lakelens package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from benchmarks.scale import hex_ids  # noqa: E402

CHUNK = 100_000


def clustered(lo: int, hi: int, dim: int, centres: np.ndarray, spread: float = 0.3) -> np.ndarray:
    r = np.random.default_rng((7, lo))
    x = centres[r.integers(len(centres), size=hi - lo)] + spread * r.standard_normal((hi - lo, dim),
                                                                                    dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows(lo: int, hi: int, dim: int, centres: np.ndarray, run: str) -> pa.Table:
    from pipelines.schema import TABLE_SCHEMA

    n = hi - lo
    ids = hex_ids(np.arange(lo, hi), salt=1)
    x = clustered(lo, hi, dim, centres)
    model = pa.array([{"task": "embed", "arch": "bench", "weights": "random:seed0"}],
                     TABLE_SCHEMA.field("models").type.value_type)
    cols = {
        "image_id": ids, "uri": ids, "content_hash": ids,
        "status": pa.array(np.full(n, "ok", object), pa.string()),
        "reason": pa.array(np.full(n, "new", object), pa.string()),
        "run_id": pa.array(np.full(n, run, object), pa.string()),
        "embedding": pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)),
                                              pa.array(x.ravel())),
        "models": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)),
                                           model.take(pa.array(np.zeros(n, np.int64)))),
    }
    return pa.table({f.name: cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type)
                     for f in TABLE_SCHEMA}, schema=TABLE_SCHEMA)


def centres_for(n: int, dim: int) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((max(1, n // 100), dim)).astype(np.float32)


def child_table(out: str, n: int, dim: int) -> None:
    from pipelines.lake.table import create_or_open, open_table, save_meta
    from pipelines.lake.upkeep import run_upkeep

    t = time.perf_counter()
    table = create_or_open(out)
    table.meta["embedding_dim"] = dim
    table.meta["models"] = {"embed": {"arch": "bench", "weights_id": "random:seed0", "spec": "random",
                                      "embedding_dim": dim}}
    save_meta(table)
    centres = centres_for(n, dim)
    for seq, lo in enumerate(range(0, n, CHUNK), start=1):
        table.commit(rows(lo, min(n, lo + CHUNK), dim, centres, "build"), run_id="build", seq=seq, epoch=1)
    run_upkeep(open_table(out))
    print(json.dumps({"table_s": round(time.perf_counter() - t, 1)}))


def child_night(out: str, n: int, dim: int, new: int) -> None:
    """Commit `new` images after the first n (a night's new images), then its upkeep."""
    from pipelines.lake.table import open_table
    from pipelines.lake.upkeep import run_upkeep

    table = open_table(out)
    centres = centres_for(n, dim)
    for seq, lo in enumerate(range(n, n + new, CHUNK), start=1):
        table.commit(rows(lo, min(n + new, lo + CHUNK), dim, centres, "night"), run_id="night", seq=seq,
                     epoch=1)
    run_upkeep(open_table(out))
    print(json.dumps({"night": new}))


class PeakRSS:
    """Peak RSS of this process and of each of its descendants (a local Ray's workers),
    sampled."""

    def __init__(self, every_s: float = 0.2):
        import psutil

        self.psutil, self.every_s = psutil, every_s
        self.workers: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for p in self.psutil.Process().children(recursive=True):
                try:
                    rss = p.memory_info().rss
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    continue
                self.workers[p.pid] = max(self.workers.get(p.pid, 0), rss)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "worker_max": max(self.workers.values(), default=0)}


def child_build(results: str, out: str, shards: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="  [build %(relativeCreated).0f ms] %(message)s")
    from pipelines.indexing import IndexBuildConfig, build

    if shards > 1:
        import ray

        from pipelines.cluster.local import start_local_ray

        start_local_ray(2, dashboard=False)
        ray.get([ray.remote(lambda: None).remote() for _ in range(2)])  # workers up before the clock
    peak = PeakRSS()
    t = time.perf_counter()
    m = build(IndexBuildConfig(results=results, out=out, shards=shards))
    wall = time.perf_counter() - t
    print(json.dumps({"wall_s": round(wall, 2), "rss": peak.stop(), "factory": m["factory"],
                      "recall_at_10": m["recall_at_10"], "shards": m["shards"], "built_on": m["built_on"],
                      "search_params": m["search_params"]}))


def child_update(index: str, results: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="  [update %(relativeCreated).0f ms] %(message)s")
    from pipelines.indexing import update

    t = time.perf_counter()
    m = update(index, results)
    print(json.dumps({"wall_s": round(time.perf_counter() - t, 2),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "added": m["last_update"]["added"], "rebuilt": m["last_update"].get("rebuilt"),
                      "segments": len(m.get("segments", []))}))


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True,
                          check=False, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode:
        sys.exit(f"child {args[0]} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        if kind == "table":
            child_table(rest[0], int(rest[1]), int(rest[2]))
        elif kind == "night":
            child_night(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        elif kind == "build":
            child_build(rest[0], rest[1], int(rest[2]))
        else:
            child_update(rest[0], rest[1])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI sizes (30k and 120k x 32)")
    p.add_argument("--sizes", default="1000000,10000000", help="comma-separated row counts")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--shards", type=int, default=4, help="shards of the Ray build")
    p.add_argument("--data", default=os.environ.get("LAKELENS_BENCH_DATA", "/tmp/lakelens-index-scale"),
                   help="where the tables live (reused with --reuse)")
    p.add_argument("--reuse", action="store_true", help="keep tables from an earlier run")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    sizes = [30_000, 120_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    dim = 32 if args.quick else args.dim
    data = Path(args.data)
    result: dict = {"bench": "index_scale", "quick": args.quick, "dim": dim, "sizes": sizes,
                    "cpus": os.cpu_count(), "by_size": {}}
    for n in sizes:
        table = data / f"n{n}-d{dim}"
        fresh = not (args.reuse and (table / "bench_done").exists())
        if fresh:
            shutil.rmtree(table, ignore_errors=True)
            made = run_child("table", str(table), str(n), str(dim))
            (table / "bench_done").write_text(json.dumps(made))
        entry: dict = {"raw_vector_bytes": n * dim * 4}
        idx = data / f"n{n}-d{dim}-index"
        shutil.rmtree(idx, ignore_errors=True)
        if n == sizes[-1]:
            one = run_child("build", str(table), str(data / f"n{n}-one"), "0")
            shutil.rmtree(data / f"n{n}-one", ignore_errors=True)
            sharded = run_child("build", str(table), str(idx), str(args.shards))
            largest = max(sharded["rss"]["driver"], sharded["rss"]["worker_max"])
            entry.update({"one_process": one, "sharded": sharded,
                          "sharded_over_one_wall": round(sharded["wall_s"] / one["wall_s"], 3),
                          "largest_rss_over_raw": round(largest / entry["raw_vector_bytes"], 3),
                          "one_process_rss_over_raw": round(one["rss"]["driver"] / entry["raw_vector_bytes"],
                                                            3)})
            full_wall = one["wall_s"]
        else:
            built = run_child("build", str(table), str(idx), "0")
            entry["one_process"] = built
            full_wall = built["wall_s"]
        # A night adding 1%: committed (not timed), then the index update in its own process.
        night_table = data / f"n{n}-d{dim}-night"
        shutil.rmtree(night_table, ignore_errors=True)
        shutil.copytree(table, night_table)
        run_child("night", str(night_table), str(n), str(dim), str(max(1, n // 100)))
        up = run_child("update", str(idx), str(night_table))
        shutil.rmtree(night_table, ignore_errors=True)
        entry.update({"update": up, "update_over_full_build_wall": round(up["wall_s"] / full_wall, 4)})
        result["by_size"][str(n)] = entry
        print(json.dumps({"size": n, **entry}), file=sys.stderr)
    small, large = result["by_size"][str(sizes[0])], result["by_size"][str(sizes[-1])]
    result["summary"] = {
        "sharded_over_one_wall": large.get("sharded_over_one_wall"),
        "largest_rss_over_raw": large.get("largest_rss_over_raw"),
        "recall_at_10": large["sharded"]["recall_at_10"] if "sharded" in large else None,
        "update_over_full_build_wall": large["update_over_full_build_wall"],
        "update_rss_large_over_small": round(large["update"]["peak_rss"] / small["update"]["peak_rss"], 3),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
