"""Similarity index: the `auto` choice against exact `Flat` search on N clustered vectors.

Writes N seeded clustered unit vectors (default 1,000,000 x 256; families of ~100 near
neighbours, as images of one object are) as a lakelens lake table, then builds two
indexes with `pipelines.indexing.build`, each in a fresh process so that its peak RSS is
its own: `auto` and `Flat`. Both are then searched with 1,000 held-out queries at k=10.

Printed: build time and peak memory of each (against the raw vectors, N x dim x 4 bytes),
QPS of each, recall@10 of auto against Flat's exact answers, and ratio = auto QPS / Flat
QPS. Goal: recall@10 >= 0.95 at ratio >= 10, build memory far below 2 x raw.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where "index" would name
# this file instead of the lakelens package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipelines.schema import TABLE_SCHEMA  # noqa: E402

CHUNK = 100_000
QUERIES = 1_000


def vectors(n: int, dim: int, seed: int, family: int, spread: float, start: int = 0):
    """Chunks of the same stream: centre i // family's vectors, deterministic per chunk."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // family), dim)).astype(np.float32)
    for lo in range(start, n, CHUNK):
        hi = min(n, lo + CHUNK)
        r = np.random.default_rng((seed, lo))
        which = r.integers(len(centres), size=hi - lo)
        x = centres[which] + spread * r.standard_normal((hi - lo, dim)).astype(np.float32)
        yield lo, x / np.linalg.norm(x, axis=1, keepdims=True)


def write_results(out: Path, n: int, dim: int, args: argparse.Namespace) -> None:
    """A lake table (one commit per CHUNK rows) holding the vectors as current results."""
    from pipelines.lake.sources import bucket_of
    from pipelines.lake.table import create_or_open, save_meta

    table = create_or_open(str(out))
    table.meta["embedding_dim"] = dim
    table.meta["models"] = {"embed": {"arch": "bench", "weights_id": "random:seed0",
                                      "spec": "random", "embedding_dim": dim}}
    save_meta(table)
    models = [{"task": "embed", "arch": "bench", "weights": "random:seed0"}]
    for seq, (lo, x) in enumerate(vectors(n, dim, args.seed, args.family, args.spread), start=1):
        m = len(x)
        ids = [f"{i:09d}" for i in range(lo, lo + m)]
        cols = {f.name: pa.nulls(m, f.type) for f in TABLE_SCHEMA}
        cols.update({
            "image_id": pa.array(ids), "uri": pa.array([f"s3://lake/{i}.jpg" for i in ids]),
            "bucket": pa.array([bucket_of(i, table.buckets) for i in ids], pa.int32()),
            "content_hash": pa.array(ids), "status": pa.array(["ok"] * m),
            "is_current": pa.array(np.ones(m, bool)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim).cast(
                TABLE_SCHEMA.field("embedding").type),
            "models": pa.array([models] * m, type=TABLE_SCHEMA.field("models").type),
            "annotated_at": pa.array([0] * m, type=pa.int64()).cast(TABLE_SCHEMA.field("annotated_at").type),
        })
        table.commit(pa.table(cols, schema=TABLE_SCHEMA), None, run_id="bench", seq=seq, epoch=1)


def child_build(results: str, out: str, factory: str) -> None:
    from pipelines.indexing import IndexBuildConfig, build

    t = time.perf_counter()
    m = build(IndexBuildConfig(results=results, out=out, factory=factory))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"build_s": time.perf_counter() - t, "peak_rss": peak, "factory": m["factory"],
                      "recall_at_10": m["recall_at_10"], "search_params": m["search_params"]}))


def run_child(results: Path, out: Path, factory: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(results), str(out), factory],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"build {factory} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def qps(index_dir: Path, queries: np.ndarray, k: int = 10) -> tuple[float, list]:
    from index.store import open_index

    idx = open_index(index_dir)
    idx.search(queries[:10], k)  # warm
    t = time.perf_counter()
    found = idx.search(queries, k)
    return len(queries) / (time.perf_counter() - t), found.image_ids


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_build(*sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--family", type=int, default=100, help="vectors per cluster")
    p.add_argument("--spread", type=float, default=0.5, help="noise around a cluster centre")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CI size: 20,000 x 64")
    args = p.parse_args()
    if args.quick:
        args.n, args.dim = 20_000, 64
    raw = args.n * args.dim * 4
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        write_results(tmp / "res", args.n, args.dim, args)
        print(f"wrote {args.n} x {args.dim} vectors in {time.perf_counter() - t:.1f} s", flush=True)
        # Held-out queries: the same clusters, vectors the index has not seen.
        queries = next(vectors(args.n + QUERIES, args.dim, args.seed, args.family, args.spread,
                               start=args.n))[1][:QUERIES]
        auto = run_child(tmp / "res", tmp / "auto", "auto")
        print(f"auto: {auto['factory']} built in {auto['build_s']:.1f} s, peak RSS "
              f"{auto['peak_rss'] / 2**30:.2f} GiB (raw vectors {raw / 2**30:.2f} GiB)", flush=True)
        flat = run_child(tmp / "res", tmp / "flat", "Flat")
        print(f"Flat: built in {flat['build_s']:.1f} s, peak RSS {flat['peak_rss'] / 2**30:.2f} GiB",
              flush=True)
        auto_qps, auto_rows = qps(tmp / "auto", queries)
        flat_qps, flat_rows = qps(tmp / "flat", queries)
    hits = sum(len(set(a) & set(b)) for a, b in zip(auto_rows, flat_rows, strict=True))
    recall = hits / (10 * len(queries))
    print(f"QPS at k=10: auto {auto_qps:.0f}, Flat (exact) {flat_qps:.0f}, ratio "
          f"{auto_qps / flat_qps:.1f}; recall@10 of auto vs exact {recall:.3f}")
    print(json.dumps({
        "bench": "index", "n": args.n, "dim": args.dim, "cpus": os.cpu_count(),
        "auto_factory": auto["factory"], "auto_search_params": auto["search_params"],
        "auto_build_s": round(auto["build_s"], 2), "auto_peak_rss_gib": round(auto["peak_rss"] / 2**30, 3),
        "flat_build_s": round(flat["build_s"], 2), "flat_peak_rss_gib": round(flat["peak_rss"] / 2**30, 3),
        "raw_gib": round(raw / 2**30, 3), "auto_qps": round(auto_qps, 1), "flat_qps": round(flat_qps, 1),
        "recall_at_10": round(recall, 4), "ratio": round(auto_qps / flat_qps, 2),
    }))


if __name__ == "__main__":
    main()
