"""The similarity service at scale: filtered and unfiltered search on 1M and 10M images.

A synthetic annotations table is written through lakelens's commit path (LakeTable.commit
in chunks of 100,000 rows, then one upkeep: the snapshot): N images with 128-d clustered
unit embeddings (benchmarks/index.py's generator) and 5 detections per image on average
(3..7) of 80 common labels with uniform scores, plus one `rare` detection (score 0.9) on
exactly 1% of the images. The index is built with pipelines.indexing.build (auto
factory) in a process of its own. Tables and indexes live under --dir (default
/work/bench-data/serve_scale) and are kept: --reuse skips what exists.

Per size, `lakelens serve` runs in its own process on loopback; k=10 vector queries
(held-out vectors of the same clusters) at concurrency 8 for --duration s: p50/p99 with
no filter and with the 1% label filter (label=rare). In the benchmark's own process:
Facets.select of that filter against the full-scan mask it replaced (one pass and a
bincount over every detection). Measured beside: the service's facet
build time (/stats) and RSS (VmRSS and VmHWM of its process), the image lookup the
overlay makes (LakeTable.lookup: row groups pruned by image_id statistics) against the
scan of the image's part it replaced, and a reload under load: a night appends 0.1% new
images (and changes 0.01%), `index update` switches a new version in, while 8 clients
query with the filter; every request must succeed, the service must end on the new
version, with its facets built incrementally (time from /stats).

Targets at the largest size: filtered p99 <= 20 ms, unfiltered p99 <= 10 ms, p99 at the
largest size / at the smallest <= 1.5 (both filtered and unfiltered), reload failed == 0.
The last stdout line is one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from benchmarks.index import vectors  # noqa: E402
from benchmarks.scale import hex_ids  # noqa: E402

K = 10
DIM = 128
CHUNK = 100_000
FAMILY, SPREAD = 100, 0.5
LABELS = [f"class{i}" for i in range(80)]
RARE = "rare"  # on exactly 1% of the images (image number % 100 == 37)
STATE = "bench_state.json"


def rows_of(idx: np.ndarray, emb: np.ndarray, *, version: int, rng: np.random.Generator) -> pa.Table:
    """TABLE_SCHEMA rows for image numbers `idx` with embeddings `emb` (float32[n, DIM])."""
    from pipelines.schema import TABLE_SCHEMA

    n = len(idx)
    ids = hex_ids(idx)
    counts = rng.integers(3, 8, n)  # 5 on average
    rare = (idx % 100) == 37
    per = counts + rare
    m = int(per.sum())
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(per, out=offsets[1:])
    label = rng.integers(0, len(LABELS), m).astype(np.int32)
    score = rng.random(m, dtype=np.float32)
    first = offsets[:-1][rare]  # the rare detection is each such image's first
    label[first] = len(LABELS)
    score[first] = 0.9
    names = pa.array([*LABELS, RARE])
    box = pa.ListArray.from_arrays(pa.array(np.arange(0, 4 * m + 1, 4, dtype=np.int32)),
                                   pa.array(rng.random(4 * m, dtype=np.float32) * 320))
    dets = pa.StructArray.from_arrays([box, pa.array(label), names.take(pa.array(label)), pa.array(score)],
                                      names=["box", "label", "label_name", "score"])
    model = pa.array([{"task": "detect", "arch": "bench", "weights": "random:seed0"},
                      {"task": "embed", "arch": "bench", "weights": "random:seed0"}],
                     TABLE_SCHEMA.field("models").type.value_type)
    import pyarrow.compute as pc

    cols = {
        "image_id": ids,
        "uri": pc.binary_join_element_wise(pa.scalar("s3://lake/images/"), ids, pa.scalar(".jpg"),
                                           pa.scalar("")),
        "content_hash": hex_ids(idx, salt=version + 1),
        "status": pa.array(np.full(n, "ok", object), pa.string()),
        "width": pa.array(rng.choice(np.array([320, 640, 1024, 2048], np.int32), n)),
        "height": pa.array(rng.choice(np.array([240, 480, 768, 1536], np.int32), n)),
        "run_id": pa.array(np.full(n, f"night-{version}", object), pa.string()),
        "reason": pa.array(np.full(n, "new", object), pa.string()),
        "annotated_at": pa.array(1_700_000_000_000_000 + idx.astype(np.int64) * 1000).cast(
            TABLE_SCHEMA.field("annotated_at").type),
        "detections": pa.ListArray.from_arrays(pa.array(offsets), dets),
        "embedding": pa.ListArray.from_arrays(pa.array(np.arange(0, n * DIM + 1, DIM, dtype=np.int32)),
                                              pa.array(np.ascontiguousarray(emb, np.float32).ravel())),
        "models": pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)),
                                           model.take(pa.array(np.tile([0, 1], n)))),
    }
    return pa.table({f.name: cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type)
                     for f in TABLE_SCHEMA}, schema=TABLE_SCHEMA)


def child_build(root: str, n: int, seed: int) -> None:
    """The table (commit path + upkeep), then the index (pipelines.indexing.build)."""
    from benchmarks.index import peak_rss
    from pipelines.indexing import IndexBuildConfig, build
    from pipelines.lake.table import create_or_open, open_table, save_meta
    from pipelines.lake.upkeep import run_upkeep

    out = Path(root)
    t = time.perf_counter()
    table = create_or_open(str(out / "lake"), buckets=16)
    table.meta["embedding_dim"] = DIM
    spec = {"arch": "bench", "weights_id": "random:seed0", "spec": "random", "labels": [*LABELS, RARE],
            "keypoint_names": []}
    table.meta["models"] = {"detect": dict(spec), "embed": {**spec, "labels": [], "embedding_dim": DIM}}
    save_meta(table)
    rng = np.random.default_rng(seed)
    for seq, (lo, x) in enumerate(vectors(n, DIM, seed, FAMILY, SPREAD), start=1):
        table.commit(rows_of(np.arange(lo, lo + len(x)), x, version=0, rng=rng), run_id="build", seq=seq,
                     epoch=1)
    run_upkeep(open_table(str(out / "lake")))
    table_s = time.perf_counter() - t
    t = time.perf_counter()
    m = build(IndexBuildConfig(results=str(out / "lake"), out=str(out / "index")))
    state = {"n": n, "next": n, "seq": n // CHUNK + 2, "version": 0, "table_s": round(table_s, 1),
             "index_s": round(time.perf_counter() - t, 1), "factory": m["factory"],
             "recall_at_10": m["recall_at_10"], "build_peak_rss": peak_rss()}
    (out / STATE).write_text(json.dumps(state))
    print(json.dumps(state))


def child_night(root: str, seed: int) -> None:
    """0.1% new images and 0.01% changed ones committed, then `index update`."""
    from pipelines.indexing import update
    from pipelines.lake.table import open_table

    out = Path(root)
    state = json.loads((out / STATE).read_text())
    n, start = state["n"], state["next"]
    state["version"] += 1
    rng = np.random.default_rng(seed + state["version"])
    new = max(1, n // 1000)
    changed = np.unique(rng.integers(0, n, max(1, n // 10_000)))
    idx = np.concatenate([np.arange(start, start + new), changed])
    x = np.concatenate([v for _, v in vectors(start + len(idx), DIM, seed, FAMILY, SPREAD, start=start,
                                              centres_of=n)])  # the changed get fresh vectors too
    t = time.perf_counter()
    table = open_table(str(out / "lake"))
    state["seq"] += 1
    table.commit(rows_of(idx, x, version=state["version"], rng=rng), run_id="nights", seq=state["seq"],
                 epoch=1)
    commit_s = time.perf_counter() - t
    t = time.perf_counter()
    m = update(str(out / "index"), str(out / "lake"))
    state["next"] = start + new
    (out / STATE).write_text(json.dumps(state))
    print(json.dumps({"new": new, "changed": int(len(changed)), "commit_s": round(commit_s, 2),
                      "update_s": round(time.perf_counter() - t, 2), "version": m.get("version"),
                      "last_update": m.get("last_update")}))


def run_child(*args: str, timeout: float | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if proc.returncode:
        sys.exit(f"{args[0]} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_of(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return {"rss": out.get("VmRSS"), "peak_rss": out.get("VmHWM")}


def lookups(table_dir: Path, n: int, count: int, seed: int) -> dict:
    """LakeTable.lookup (row groups pruned by image_id) against a scan of the image's part
    (what it replaced), on images of the snapshot and of the log since the watermark."""
    from pipelines.lake.table import col, open_table, part_index

    table = open_table(str(table_dir))
    rng = np.random.default_rng(seed)
    ids = hex_ids(rng.integers(0, n, count)).to_pylist()
    columns = ["width", "height", "detections", "instances", "poses"]
    table.lookup(ids[0], columns)  # opens the datasets once
    lat = []
    for i in ids:
        t = time.perf_counter()
        found = table.lookup(i, columns)
        lat.append(time.perf_counter() - t)
        assert found is not None, i
    parts = table.parts()
    scan = []
    for i in ids[:5]:
        part = parts[int(part_index(pa.array([i]), parts)[0])]
        t = time.perf_counter()
        rows = [r for b in table.current_part(part, columns, where=col("image_id") == i)
                for r in b.to_pylist()]
        scan.append(time.perf_counter() - t)
        assert rows
    lat_ms = np.asarray(lat) * 1000
    return {"lookups": count, "p50_ms": round(float(np.percentile(lat_ms, 50)), 3),
            "p99_ms": round(float(np.percentile(lat_ms, 99)), 3),
            "part_scan_median_ms": round(float(np.median(scan)) * 1000, 1)}


def filter_costs(root: Path) -> dict:
    """In this process: Facets.select of the 1% label filter (what a filtered request adds
    before FAISS) against the full-scan mask it replaced (a pass and a bincount over every
    detection: the same arrays, regrouped the old way)."""
    from index import store
    from pipelines.lake.table import open_table
    from pipelines.serve.facets import Facets, Filter

    index = store.open_index(root / "index", mmap=True)
    t = time.perf_counter()
    facets = Facets(open_table(str(root / "lake")), index.ids)
    build_s = time.perf_counter() - t
    flt = Filter(label=RARE)
    lat = []
    for _ in range(200):
        t = time.perf_counter()
        rows = facets.select(flt)
        lat.append(time.perf_counter() - t)
    det_label = np.repeat(np.arange(len(facets.labels), dtype=np.int32), np.diff(facets.det.offsets))
    det_row, det_score = facets.det.rows, facets.det.values
    old = []
    for _ in range(5):
        t = time.perf_counter()
        keep = facets.present.copy()
        hits = (det_label == facets.labels[RARE]) & (det_score >= flt.min_score)
        keep &= np.bincount(det_row[hits], minlength=facets.rows) >= flt.min_count
        old.append(time.perf_counter() - t)
    assert np.array_equal(np.flatnonzero(keep), rows)
    return {"facets_build_s": round(build_s, 2), "postings": len(facets.det), "matched": len(rows),
            "select_p50_ms": round(float(np.median(lat)) * 1000, 3),
            "select_p99_ms": round(float(np.percentile(lat, 99)) * 1000, 3),
            "full_scan_mask_median_ms": round(float(np.median(old)) * 1000, 2)}


def measure(root: Path, n: int, args: argparse.Namespace) -> dict:
    import httpx

    from benchmarks.serve import free_port, http_load, start_service, stop

    state = json.loads((root / STATE).read_text())
    queries = np.concatenate([x for _, x in vectors(n + 2000, DIM, args.seed, FAMILY, SPREAD, start=n,
                                                    centres_of=n)])
    plain = [json.dumps({"vector": v.tolist(), "k": K}).encode() for v in queries]
    rare = [json.dumps({"vector": v.tolist(), "k": K, "label": RARE}).encode() for v in queries]

    def request(payloads):
        return lambda i: ("POST", "/search/vector", payloads[i % len(payloads)], "application/json")

    costs = filter_costs(root)
    print(f"n={n} filter costs in-process: {costs}", flush=True)
    port = free_port()
    t = time.perf_counter()
    service = start_service(root / "index", port, root / "serve.log")
    url = f"http://127.0.0.1:{port}"
    result: dict = {"n": n, "detections_approx": 5 * n, "table_s": state["table_s"],
                    "index_s": state["index_s"],
                    "factory": state["factory"], "recall_at_10": state["recall_at_10"],
                    "load_avg_1m_start": round(os.getloadavg()[0], 2), "filter_in_process": costs}
    try:
        stats = httpx.get(f"{url}/stats").json()
        result["start_s"] = round(time.perf_counter() - t, 1)
        result["facets"] = stats.get("facets")
        result["service_rss_after_start"] = rss_of(service.pid)
        allowed = json.loads(httpx.post(f"{url}/search/vector", content=rare[0]).text)["allowed"]
        result["filter_allowed"] = allowed
        for name, payloads in (("unfiltered", plain), ("filtered", rare)):
            asyncio.run(http_load(url, request(payloads), 8, min(2.0, args.duration)))  # warm-up
            got = asyncio.run(http_load(url, request(payloads), 8, args.duration))
            got.pop("versions")
            result[name] = got
            print(f"n={n} {name} c=8: {got}", flush=True)
        result["lookup"] = lookups(root / "lake", n, 200 if not args.quick else 50, args.seed)
        print(f"n={n} lookup: {result['lookup']}", flush=True)

        before = httpx.get(f"{url}/health").json()["index_version"]
        done, timing = threading.Event(), {}

        def night() -> None:
            time.sleep(1.0)
            timing["night"] = run_child("night", str(root), str(args.seed))
            timing["switched"] = time.perf_counter()
            deadline = time.time() + 600
            while httpx.get(f"{url}/health").json()["index_version"] == before and time.time() < deadline:
                time.sleep(0.05)
            timing["serving_new"] = time.perf_counter()
            time.sleep(2.0)
            done.set()

        worker = threading.Thread(target=night)
        worker.start()
        loaded = asyncio.run(http_load(url, request(rare), 8, 3.0, until=done))
        worker.join()
        stats = httpx.get(f"{url}/stats").json()
        result["reload"] = {"requests": loaded["requests"], "failed": loaded["failed"], "before": before,
                            "after": stats["index_version"], "served_by": loaded["versions"],
                            "p50_ms": loaded["p50_ms"], "p99_ms": loaded["p99_ms"],
                            "night": timing["night"], "facets": stats.get("facets"),
                            "switch_to_serving_s": round(timing["serving_new"] - timing["switched"], 2)}
        result["service_rss_end"] = rss_of(service.pid)
        result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)  # the machine is shared
        print(f"n={n} reload under load: {result['reload']}", flush=True)
    finally:
        stop(service)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000000,10000000", help="images per table, comma separated")
    p.add_argument("--quick", action="store_true", help="CI sizes: 30,000 and 90,000 images, 3 s each")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--dir", default="/work/bench-data/serve_scale", help="tables and indexes (kept)")
    p.add_argument("--reuse", action="store_true", help="reuse tables and indexes built before in --dir")
    p.add_argument("--build-only", action="store_true", help="build the tables and indexes, measure nothing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if args.child[0] == "build":
            child_build(args.child[1], int(args.child[2]), int(args.child[3]))
        else:
            child_night(args.child[1], int(args.child[2]))
        return 0
    if args.quick:
        args.sizes, args.duration = "30000,90000", 3.0
    sizes = [int(s) for s in args.sizes.split(",")]
    base = Path(args.dir)
    result: dict = {"bench": "serve_scale", "quick": args.quick, "sizes": sizes, "dim": DIM, "k": K,
                    "concurrency": 8, "cpus": os.cpu_count(), "duration_s": args.duration, "by_size": {}}
    for n in sizes:
        root = base / f"n{n}"
        if not (args.reuse and (root / STATE).exists()):
            if root.exists():
                import shutil

                shutil.rmtree(root)
            root.mkdir(parents=True)
            built = run_child("build", str(root), str(n), str(args.seed))
            print(f"n={n} built: {built}", flush=True)
        if not args.build_only:
            result["by_size"][str(n)] = measure(root, n, args)
    if args.build_only:
        print(json.dumps(result))
        return 0
    small, large = result["by_size"][str(sizes[0])], result["by_size"][str(sizes[-1])]
    ratio = {k: round(large[k]["p99_ms"] / small[k]["p99_ms"], 3) for k in ("unfiltered", "filtered")}
    result["p99_ratio_largest_over_smallest"] = ratio
    result["targets"] = {
        "filtered_p99_ms<=20": large["filtered"]["p99_ms"] <= 20,
        "unfiltered_p99_ms<=10": large["unfiltered"]["p99_ms"] <= 10,
        "p99_ratio<=1.5": max(ratio.values()) <= 1.5,
        "reload_failed==0": all(s["reload"]["failed"] == 0 and s["reload"]["after"] != s["reload"]["before"]
                                for s in result["by_size"].values()),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
