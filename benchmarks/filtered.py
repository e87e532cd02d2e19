"""Filtered similarity search: lakelens against LanceDB with a prefilter, same vectors, same run.

1. Writes N seeded clustered unit vectors (default 1,000,000 x 256, benchmarks/index.py's
   generator and lake-table writer) and builds the `auto` index with
   `pipelines.indexing.build` in a fresh process.
2. Two labels, drawn at random over the rows (seeded, disjoint): one on 1% of them, one on
   0.1%. 1,000 held-out queries (the same clusters, never rows of the index); the exact
   answers are the top 10 among exactly the labelled rows (brute force over their floats).
3. lakelens, one thread, one query per call: `SimilarityIndex.search(q, 10, allow=rows)`
   with the label's sorted row numbers (what the service passes), unfiltered, 1%, 0.1%:
   recall@10 and queries/s.
4. Baseline (with --lance-python, a separate venv holding lancedb; this file runs there
   as a child with --lance-child): the same vectors and labels in a LanceDB table, an
   IVF_FLAT index (dot product) and a BITMAP scalar index on the label, searched with
   `.where(label, prefilter=True)`, one query per call, one compute thread
   (LANCE_CPU_THREADS=1); nprobes the smallest of a ladder reaching recall@10 >= 0.95 on
   the first 200 queries, then all queries timed. --lance-pq adds IVF_PQ (refine_factor
   10). Without --lance-python the JSON says the baseline was skipped.

Printed: recall@10 and q/s of each; ratio = lakelens filtered q/s / LanceDB filtered q/s
(its best index reaching the recall target, else its best recall). Targets: recall@10 >=
0.95 at 1% and 0.1%, ratio >= 10. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where "index" would name
# benchmarks/index.py instead of the lakelens package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

K = 10
QUERIES = 1_000
TUNE_QUERIES = 200
TARGET = 0.95
LABELS = {"1pct": 0.01, "0.1pct": 0.001}  # label name -> share of rows
LANCE_NPROBES = (20, 30, 50, 75, 100, 150, 200, 300, 400, 600, 800, 1200)


def recall(found: list[np.ndarray] | np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(np.asarray(f).tolist()) & set(t.tolist()) - {-1})
               for f, t in zip(found, truth, strict=True))
    return hits / (K * len(truth))


# ---- LanceDB side (runs in its own venv: numpy, pyarrow, lancedb only) -------------------

def lance_child(work: str, pq: bool) -> None:
    """Build LanceDB tables over work/vectors.npy and answer work/queries.npy; prints one
    JSON line."""
    import lancedb
    import pyarrow as pa

    work_dir = Path(work)
    x = np.load(work_dir / "vectors.npy", mmap_mode="r")
    tags = np.load(work_dir / "tags.npy")
    queries = np.load(work_dir / "queries.npy")
    truths = {name: np.load(work_dir / f"truth_{name}.npy") for name in LABELS}
    n, dim = x.shape
    schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), dim)),
                        ("tag", pa.int32())])

    def batches():
        for lo in range(0, n, 100_000):
            hi = min(n, lo + 100_000)
            vec = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x[lo:hi]).ravel()), dim)
            yield pa.record_batch([pa.array(np.arange(lo, hi)), vec, pa.array(tags[lo:hi])],
                                  schema=schema)

    db = lancedb.connect(str(work_dir / "lance"))
    t = time.perf_counter()
    table = db.create_table("vectors", data=pa.RecordBatchReader.from_batches(schema, batches()))
    out: dict = {"lancedb": lancedb.__version__, "write_s": round(time.perf_counter() - t, 1)}
    t = time.perf_counter()
    table.create_scalar_index("tag", index_type="BITMAP")
    out["bitmap_index_s"] = round(time.perf_counter() - t, 1)
    for kind in ("IVF_FLAT", "IVF_PQ") if pq else ("IVF_FLAT",):
        t = time.perf_counter()
        extra = {"num_sub_vectors": dim // 8} if kind == "IVF_PQ" else {}
        table.create_index(metric="dot", vector_column_name="vector", index_type=kind,
                           replace=True, **extra)
        res: dict = {"build_s": round(time.perf_counter() - t, 1)}
        for name, truth in truths.items():
            where = f"tag = {list(LABELS).index(name) + 1}"

            def search(q, nprobes, where=where, kind=kind):
                query = (table.search(q, vector_column_name="vector").distance_type("dot")
                         .where(where, prefilter=True).nprobes(nprobes).limit(K).select(["id"]))
                if kind == "IVF_PQ":
                    query = query.refine_factor(10)
                return query.to_arrow().column("id").to_numpy()

            best = None
            for nprobes in LANCE_NPROBES:
                r = recall([search(q, nprobes) for q in queries[:TUNE_QUERIES]], truth[:TUNE_QUERIES])
                best = (r, nprobes) if best is None or r > best[0] else best
                if r >= TARGET:
                    best = (r, nprobes)
                    break
            nprobes = best[1]
            search(queries[0], nprobes)
            t = time.perf_counter()
            found = [search(q, nprobes) for q in queries]
            qps = len(queries) / (time.perf_counter() - t)
            res[name] = {"nprobes": nprobes, "recall_at_10": round(recall(found, truth), 4),
                         "qps": round(qps, 1)}
            print(f"  LanceDB {kind} {name}: nprobes {nprobes}, recall@10 "
                  f"{res[name]['recall_at_10']:.4f}, {qps:.1f} q/s", file=sys.stderr, flush=True)
        out[kind] = res
    print(json.dumps(out))


def run_lance(python: str, work: Path, pq: bool) -> dict:
    env = {**os.environ, "LANCE_CPU_THREADS": "1", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "LANCEDB_LOG": "error"}
    proc = subprocess.run([python, __file__, "--lance-child", str(work)] + (["--lance-pq"] if pq else []),
                          stdout=subprocess.PIPE, text=True, env=env, check=False)
    if proc.returncode:
        sys.exit(f"the LanceDB side failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- lakelens side -------------------------------------------------------------------------

def lakelens_side(index_dir: Path, queries: np.ndarray, filters: dict[str, np.ndarray | None],
                  truths: dict[str, np.ndarray], data_row: np.ndarray) -> dict:
    """recall@10 and q/s of SimilarityIndex.search, one thread, one query per call."""
    import faiss

    from index.store import open_index

    faiss.omp_set_num_threads(1)
    idx = open_index(index_dir)
    out = {}
    for name, rows in filters.items():
        idx.search(queries[0], K, allow=rows)  # warm-up (the row -> list map, if any)
        t = time.perf_counter()
        found = [idx.search(q, K, allow=rows).rows[0] for q in queries]
        qps = len(queries) / (time.perf_counter() - t)
        plan = None
        if rows is not None:
            nprobe = idx.manifest["search_params"].get("nprobe")
            plan = idx._filtered.plan(len(rows), nprobe)
        out[name] = {"recall_at_10": round(recall([data_row[f] for f in found], truths[name]), 4),
                     "qps": round(qps, 1), "allowed": None if rows is None else len(rows),
                     "plan": None if plan is None else plan.kind}
        print(f"lakelens {name}: recall@10 {out[name]['recall_at_10']:.4f}, {qps:.0f} q/s"
              + (f" ({plan.kind} plan, {len(rows)} rows allowed)" if plan else ""), flush=True)
    return out


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--lance-child":
        lance_child(sys.argv[2], "--lance-pq" in sys.argv)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import faiss
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from benchmarks.common import emit
    from benchmarks.index import peak_rss, run_child, vectors, write_results
    from index.store import current_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--family", type=int, default=100, help="vectors per cluster")
    p.add_argument("--spread", type=float, default=0.5, help="noise around a cluster centre")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lance-python", help="python of a venv with lancedb 0.40 (absent: no baseline)")
    p.add_argument("--lance-pq", action="store_true", help="also measure LanceDB's IVF_PQ")
    p.add_argument("--quick", action="store_true", help="CI size: 200,000 x 64")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    if args.quick:
        args.n, args.dim = 200_000, 64
    lance_python = args.lance_python if args.lance_python and Path(args.lance_python).exists() else None
    if args.lance_python and not lance_python:
        print(f"{args.lance_python} does not exist: LanceDB baseline skipped", flush=True)
    with tempfile.TemporaryDirectory(prefix="lakelens-bench-filtered-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        write_results(tmp / "res", args.n, args.dim, args)
        print(f"wrote {args.n} x {args.dim} vectors in {time.perf_counter() - t:.1f} s", flush=True)
        built = run_child(tmp / "res", tmp / "auto", "auto")
        print(f"auto: {built['factory']} built in {built['build_s']:.1f} s; tuned "
              f"{built['search_params']}", flush=True)
        x = np.concatenate([b for _, b in vectors(args.n, args.dim, args.seed, args.family, args.spread)])
        queries = next(vectors(args.n + QUERIES, args.dim, args.seed, args.family, args.spread,
                               start=args.n, centres_of=args.n))[1][:QUERIES]
        rng = np.random.default_rng(args.seed + 1)
        order = rng.permutation(args.n)  # disjoint labels: 1% then 0.1% of a shuffle
        tags = np.zeros(args.n, np.int32)
        labelled, at = {}, 0
        for tag, (name, share) in enumerate(LABELS.items(), start=1):
            labelled[name] = np.sort(order[at:at + int(round(share * args.n))])
            tags[labelled[name]] = tag
            at += len(labelled[name])
        truths = {"unfiltered": faiss.knn(queries, x, K, metric=faiss.METRIC_INNER_PRODUCT)[1]}
        for name, data_rows in labelled.items():
            found = faiss.knn(queries, np.ascontiguousarray(x[data_rows]), K,
                              metric=faiss.METRIC_INNER_PRODUCT)[1]
            truths[name] = data_rows[found]
        # index row -> data row (image ids are the data rows' numbers), and back
        ids = pq.read_table(current_dir(tmp / "auto") / "ids.parquet", columns=["image_id"])
        data_row = pc.cast(ids.column("image_id"), pa.int64()).to_numpy()
        index_row = np.empty(args.n, np.int64)
        index_row[data_row] = np.arange(len(data_row))
        filters = {"unfiltered": None, **{name: np.sort(index_row[r]) for name, r in labelled.items()}}
        ours = lakelens_side(tmp / "auto", queries, filters, truths, data_row)
        lance = None
        if lance_python:
            work = tmp / "lance-work"
            work.mkdir()
            np.save(work / "vectors.npy", x)
            np.save(work / "tags.npy", tags)
            np.save(work / "queries.npy", queries)
            for name in LABELS:
                np.save(work / f"truth_{name}.npy", truths[name])
            del x
            lance = run_lance(lance_python, work, args.lance_pq)
    result = {
        "bench": "filtered", "n": args.n, "dim": args.dim, "queries": QUERIES, "k": K,
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "threads": 1,
        "factory": built["factory"], "search_params": built["search_params"],
        "build_s": round(built["build_s"], 1), "lakelens": ours,
        "lancedb": lance if lance else "skipped (no --lance-python)",
    }
    if lance:
        for name in LABELS:
            runs = [(kind, lance[kind][name]) for kind in ("IVF_FLAT", "IVF_PQ") if kind in lance]
            good = [r for r in runs if r[1]["recall_at_10"] >= TARGET]
            kind, best = (max(good, key=lambda r: r[1]["qps"]) if good
                          else max(runs, key=lambda r: r[1]["recall_at_10"]))
            result[f"ratio_{name}"] = round(ours[name]["qps"] / best["qps"], 1)
            result[f"lancedb_best_{name}"] = {"index": kind, **best}
            print(f"{name}: lakelens {ours[name]['qps']:.0f} q/s at recall@10 "
                  f"{ours[name]['recall_at_10']:.3f}; LanceDB {kind} {best['qps']:.1f} q/s at "
                  f"{best['recall_at_10']:.3f}; ratio {result[f'ratio_{name}']}", flush=True)
    result["bench_peak_rss_gib"] = round(peak_rss() / 2**30, 3)
    emit(result, args.out)


if __name__ == "__main__":
    main()
