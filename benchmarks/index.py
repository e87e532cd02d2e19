"""Similarity index at scale: the `auto` index against exact (Flat) search on N clustered vectors.

Writes N seeded clustered unit vectors (default 1,000,000 x 256; families of ~100 near
neighbours, as images of one object are) as a lakelens lake table, then builds the `auto`
index with `pipelines.indexing.build` in a fresh process, so that its peak RSS is its own.
1,000 held-out queries (the same clusters, never rows of the index, nor the rows the build
tunes on) are searched at k=10 in one batch with FAISS's threads; a QPS is the median of
3 such searches (the streamed exact baseline below: one pass).

Exact baseline, measured in the same run: while the raw vectors are at most --flat-max-gb,
a Flat index is built the same way (a fresh process) and searched; above that, exact
search runs over the vectors regenerated block by block (FAISS brute force per block,
top-k merged; only the search is timed), never holding them all.

Printed: build time and peak RSS of the auto build (against the raw vectors, N x dim x 4
bytes), QPS of auto and of exact search, recall@10 of auto against the exact answers, and
ratio = auto QPS / exact QPS. Targets: 1M x 256 built in <= 50 s at peak RSS <= 1.5x raw;
10M x 256 at recall@10 >= 0.95, ratio >= 50, peak RSS <= 8 GiB.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
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
K = 10


def vectors(n: int, dim: int, seed: int, family: int, spread: float, start: int = 0,
            centres_of: int | None = None):
    """Chunks (first row, float32[rows, dim]) of one deterministic stream: around
    (centres_of or n) // family centres; rows past n (start >= n) are fresh vectors of the
    same clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, (centres_of or n) // family), dim)).astype(np.float32)
    for lo in range(start, n, CHUNK):
        hi = min(n, lo + CHUNK)
        r = np.random.default_rng((seed, lo))
        which = r.integers(len(centres), size=hi - lo)
        x = centres[which] + spread * r.standard_normal((hi - lo, dim)).astype(np.float32)
        yield lo, x / np.linalg.norm(x, axis=1, keepdims=True)


def write_results(out: Path, n: int, dim: int, args: argparse.Namespace) -> None:
    """A lake table (one commit per CHUNK rows) holding the vectors as current results."""
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
            "content_hash": pa.array(ids), "status": pa.array(["ok"] * m),
            "reason": pa.array(["new"] * m),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim).cast(
                TABLE_SCHEMA.field("embedding").type),
            "models": pa.array([models] * m, type=TABLE_SCHEMA.field("models").type),
            "annotated_at": pa.array([0] * m, type=pa.int64()).cast(TABLE_SCHEMA.field("annotated_at").type),
        })
        table.commit(pa.table(cols, schema=TABLE_SCHEMA), run_id="bench", seq=seq, epoch=1)


def child_build(results: str, out: str, factory: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="  [build %(relativeCreated).0f ms] %(message)s")
    from pipelines.indexing import IndexBuildConfig, build

    t = time.perf_counter()
    m = build(IndexBuildConfig(results=results, out=out, factory=factory))
    peak = peak_rss()
    print(json.dumps({"build_s": time.perf_counter() - t, "peak_rss": peak, "factory": m["factory"],
                      "reason": m["factory_reason"], "recall_at_10": m["recall_at_10"],
                      "search_params": m["search_params"]}))


def run_child(results: Path, out: Path, factory: str) -> dict:
    """Build in a fresh process (its progress goes to stderr); its result line."""
    proc = subprocess.run([sys.executable, __file__, "--child", str(results), str(out), factory],
                          stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        sys.exit(f"build {factory} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def open_built(index_dir: Path):
    """The FAISS index as lakelens stores and searches it (tuned parameters applied), and
    row -> data row (image ids are the data rows' numbers)."""
    import pyarrow.compute as pc

    from index.build import set_search_params
    from index.store import current_dir, load_manifest
    from index.versions import read_ids, read_index

    path = current_dir(index_dir)
    manifest = load_manifest(path)
    index, _ = read_index(path, manifest)
    set_search_params(index, manifest.get("search_params", {}))
    ids = read_ids(path, manifest, ["image_id"]).column("image_id")
    return index, pc.cast(ids, pa.int64()).to_numpy()


def timed_search(index, queries: np.ndarray, repeats: int = 3) -> tuple[float, np.ndarray]:
    """QPS of a batch search of all queries (FAISS's threads; after a warm-up): the median
    of `repeats` runs, as one run on shared cores can be slowed by others; and the rows found."""
    index.search(queries[:10], K)
    spent = []
    for _ in range(repeats):
        t = time.perf_counter()
        _, rows = index.search(queries, K)
        spent.append(time.perf_counter() - t)
    return len(queries) / float(np.median(spent)), rows


def streamed_exact(args: argparse.Namespace, queries: np.ndarray) -> tuple[float, np.ndarray]:
    """Exact top-K (data rows) of the queries over the regenerated vectors, block by block,
    and the QPS of that brute force (search time only, not the regeneration)."""
    import faiss

    heap = faiss.ResultHeap(len(queries), K, keep_max=True)
    flat = faiss.IndexFlatIP(args.dim)
    spent = 0.0
    for lo, x in vectors(args.n, args.dim, args.seed, args.family, args.spread):
        t = time.perf_counter()
        flat.add(x)
        dist, rows = flat.search(queries, K)
        flat.reset()
        spent += time.perf_counter() - t
        heap.add_result(dist, rows + lo)
    heap.finalize()
    return len(queries) / spent, heap.I


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, which starts afresh at exec (ru_maxrss
    would start from the parent's peak at fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
    p.add_argument("--flat-max-gb", type=float, default=4.0,
                   help="build a Flat index as the exact baseline up to this many GiB of raw "
                        "vectors; above, brute force over streamed blocks (default 4)")
    p.add_argument("--quick", action="store_true", help="CI size: 200,000 x 64")
    args = p.parse_args()
    if args.quick:
        args.n, args.dim = 200_000, 64
    raw = args.n * args.dim * 4
    with tempfile.TemporaryDirectory(prefix="lakelens-bench-index-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        write_results(tmp / "res", args.n, args.dim, args)
        print(f"wrote {args.n} x {args.dim} vectors in {time.perf_counter() - t:.1f} s", flush=True)
        # Held-out queries: the same clusters, vectors the index has not seen.
        queries = next(vectors(args.n + QUERIES, args.dim, args.seed, args.family, args.spread,
                               start=args.n, centres_of=args.n))[1][:QUERIES]
        auto = run_child(tmp / "res", tmp / "auto", "auto")
        print(f"auto: {auto['factory']} built in {auto['build_s']:.1f} s, peak RSS "
              f"{auto['peak_rss'] / 2**30:.2f} GiB = {auto['peak_rss'] / raw:.2f}x the raw vectors "
              f"({raw / 2**30:.2f} GiB); tuned {auto['search_params']}", flush=True)
        index, auto_ids = open_built(tmp / "auto")
        auto_bytes = sum(f.stat().st_size for f in (tmp / "auto").rglob("*.faiss"))
        auto_qps, auto_rows = timed_search(index, queries)
        del index
        flat = None
        if raw <= args.flat_max_gb * 2**30:
            flat = run_child(tmp / "res", tmp / "flat", "Flat")
            print(f"Flat: built in {flat['build_s']:.1f} s, peak RSS {flat['peak_rss'] / 2**30:.2f} GiB",
                  flush=True)
            index, flat_ids = open_built(tmp / "flat")
            flat_qps, flat_rows = timed_search(index, queries)
            del index
            truth, exact_mode = flat_ids[flat_rows], "flat_index"
        else:
            flat_qps, truth = streamed_exact(args, queries)
            exact_mode = "streamed_blocks"
    found = np.where(auto_rows >= 0, auto_ids[np.maximum(auto_rows, 0)], -1)
    hits = sum(len(set(f.tolist()) & set(t.tolist()) - {-1}) for f, t in zip(found, truth, strict=True))
    recall = hits / (K * len(queries))
    print(f"QPS at k={K}: auto {auto_qps:.0f}, exact ({exact_mode}) {flat_qps:.1f}, ratio "
          f"{auto_qps / flat_qps:.1f}; recall@{K} of auto vs exact on held-out queries {recall:.4f}")
    print(json.dumps({
        "bench": "index", "n": args.n, "dim": args.dim, "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2), "raw_gib": round(raw / 2**30, 3),
        "auto_factory": auto["factory"], "auto_search_params": auto["search_params"],
        "auto_build_s": round(auto["build_s"], 2), "auto_peak_rss_gib": round(auto["peak_rss"] / 2**30, 3),
        "auto_peak_rss_x_raw": round(auto["peak_rss"] / raw, 3),
        "auto_index_gib": round(auto_bytes / 2**30, 3), "auto_build_recall_at_10": auto["recall_at_10"],
        "exact_baseline": exact_mode,
        "flat_build_s": round(flat["build_s"], 2) if flat else None,
        "flat_peak_rss_gib": round(flat["peak_rss"] / 2**30, 3) if flat else None,
        "auto_qps": round(auto_qps, 1), "flat_qps": round(flat_qps, 2),
        "recall_at_10": round(recall, 4), "ratio": round(auto_qps / flat_qps, 2),
        "bench_peak_rss_gib": round(peak_rss() / 2**30, 3),
    }))


if __name__ == "__main__":
    main()
