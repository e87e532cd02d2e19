"""The nightly job: incremental cost, and listing + diff at lake scale.

(a) Incremental vs full: a lake of N small images is annotated in full (embed, random
    weights), then 1% new images are added and the same command runs again.
    ratio = incremental wall time / full wall time (target <= 0.05 at N = 20,000 on 2 cores).
    A third run over the unchanged lake gives the fixed cost of a night (Ray start,
    listing, diff). --arch picks the embedder: with `tiny` a full run is almost all fixed
    cost, so the ratio is bounded below by fixed cost / full run; resnet18/50 cost per
    image what production models cost.
(b) Listing + diff: a Parquet manifest of M objects (uri, size, mtime_ns) against a table
    that already holds M - 1% of them as current rows: lakelens's distributed listing and
    bucketed diff (objects/s; target >= 50,000/s at M = 1,000,000), and the driver's peak
    RSS at M and at M / 10 (target ratio <= 1.2). Baseline measured in the same run: the
    diff a user would write by hand, in one process (read the manifest and the table's
    current ids with pandas, anti-join), with its own time and peak RSS.

Each measurement runs in a fresh process, so its peak RSS is its own.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

CHUNK = 200_000


class PeakRSS:
    """Samples this process's RSS every 20 ms (ru_maxrss would include the setup)."""

    def __init__(self) -> None:
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self) -> PeakRSS:
        self.peak = self.proc.memory_info().rss
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


def write_images(folder: Path, start: int, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:07d}.png")


def annotate_once(lake: Path, out: Path, cpus: int, arch: str) -> dict:
    from pipelines.annotate import run
    from pipelines.config import AnnotateConfig

    t = time.perf_counter()
    s = run(AnnotateConfig(sources=(str(lake),), out=str(out), tasks=("embed",),
                           weights={"embed": "random"}, archs={"embed": arch}, batch_size=32,
                           num_cpus=cpus))
    return {"wall_s": time.perf_counter() - t, "annotated": s.annotated, "listed": s.listed,
            "new": s.new, "unchanged": s.unchanged}


def child_incremental(lake: str, out: str, cpus: str, arch: str) -> None:
    print(json.dumps(annotate_once(Path(lake), Path(out), int(cpus), arch)))


def write_manifest_and_table(root: Path, m: int) -> None:
    """M manifest rows; the table already holds the first 99% as current result rows."""
    from pipelines.lake.sources import fingerprint, image_id
    from pipelines.lake.table import create_or_open
    from pipelines.schema import TABLE_SCHEMA

    table = create_or_open(str(root / "out"))
    have = m - m // 100
    writer = None
    for seq, lo in enumerate(range(0, m, CHUNK), start=1):
        hi = min(m, lo + CHUNK)
        uris = [f"s3://lake/images/{i:09d}.jpg" for i in range(lo, hi)]
        sizes = np.arange(lo, hi, dtype=np.int64) + 10_000
        mt = np.full(hi - lo, 1_700_000_000_000_000_000, np.int64)
        batch = pa.table({"uri": uris, "size": sizes, "mtime_ns": mt})
        if writer is None:
            writer = pq.ParquetWriter(root / "manifest.parquet", batch.schema)
        writer.write_table(batch)
        k = max(0, min(hi, have) - lo)
        if k:
            ids = [image_id(u) for u in uris[:k]]
            cols = {f.name: pa.nulls(k, f.type) for f in TABLE_SCHEMA}
            cols.update({
                "image_id": pa.array(ids), "uri": pa.array(uris[:k]),
                "fingerprint": pa.array([fingerprint(int(s), int(t), None)
                                         for s, t in zip(sizes[:k], mt[:k], strict=True)]),
                "status": pa.array(["ok"] * k), "reason": pa.array(["new"] * k),
                "annotated_at": pa.array([0] * k, pa.int64()).cast(TABLE_SCHEMA.field("annotated_at").type),
            })
            table.commit(pa.table(cols, schema=TABLE_SCHEMA), run_id="bench", seq=seq, epoch=1)
    writer.close()
    from pipelines.lake.upkeep import run_upkeep

    run_upkeep(table)


def child_diff(root: str, cpus: str) -> None:
    """lakelens's listing + diff, as annotate runs them, with the driver's peak RSS."""
    import ray

    from pipelines.cluster.local import start_local_ray
    from pipelines.lake import diff as D
    from pipelines.lake.sources import plan_sources
    from pipelines.lake.table import location, open_table

    start_local_ray(int(cpus))
    table = open_table(f"{root}/out")
    staging = location(f"{root}/out", "_lakelens", "staging", "bench")
    ray.data.DataContext.get_current().enable_progress_bars = False
    with PeakRSS() as rss:
        t = time.perf_counter()
        plan = plan_sources([f"{root}/manifest.parquet"])
        D.stage_listing(D.listing_dataset(plan, staging), staging, table.parts())
        counts = D.diff(f"{root}/out", staging, table.parts(), full=False, prune=False)
        wall = time.perf_counter() - t
    print(json.dumps({"wall_s": wall, "peak_rss": rss.peak, "listed": counts.listed,
                      "new": counts.new, "unchanged": counts.unchanged}))


def child_baseline(root: str) -> None:
    """The hand-written diff: everything in one process with pandas."""
    import pandas as pd
    from deltalake import DeltaTable

    from pipelines.lake.sources import fingerprint, image_id

    with PeakRSS() as rss:
        t = time.perf_counter()
        listed = pd.read_parquet(f"{root}/manifest.parquet")
        listed["image_id"] = [image_id(u) for u in listed["uri"]]
        listed["fingerprint"] = [fingerprint(int(s), int(m), None)
                                 for s, m in zip(listed["size"], listed["mtime_ns"], strict=True)]
        current = DeltaTable(f"{root}/out/log").to_pandas(columns=["image_id", "fingerprint"])
        joined = listed.merge(current, on="image_id", how="left", suffixes=("", "_t"))
        todo = joined[joined["fingerprint_t"].isna() | (joined["fingerprint"] != joined["fingerprint_t"])]
        wall = time.perf_counter() - t
    print(json.dumps({"wall_s": wall, "peak_rss": rss.peak, "listed": len(listed),
                      "new": len(todo)}))


def run_child(*args: str) -> dict:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode:
        sys.exit(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _round(x: float, ndigits: int = 0) -> float | int | None:
    """Rounded figure; a part not run (--part) is null, not NaN (which is not JSON)."""
    if x != x:
        return None
    return round(x, ndigits) if ndigits else round(x)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        {"incremental": child_incremental, "diff": child_diff,
         "baseline": child_baseline}[sys.argv[2]](*sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20_000, help="lake size for (a)")
    p.add_argument("--objects", type=int, default=1_000_000, help="manifest size for (b)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--quick", action="store_true", help="CI sizes: 1,000 images, 100,000 objects")
    p.add_argument("--part", default="all", choices=["all", "incremental", "diff"])
    p.add_argument("--arch", default="resnet18", choices=["tiny", "resnet18", "resnet50"],
                   help="embedder for (a): tiny is nearly free per image, so (a) then measures "
                        "the night's fixed cost; resnet18/50 cost what real models cost")
    args = p.parse_args()
    if args.quick:
        args.images, args.objects = 1_000, 100_000
    with tempfile.TemporaryDirectory(prefix="lakelens-nightly-") as tmp:
        tmp = Path(tmp)
        full = inc = same = {"wall_s": float("nan"), "annotated": 0}
        if args.part in ("all", "incremental"):
            t = time.perf_counter()
            write_images(tmp / "lake", 0, args.images)
            print(f"wrote {args.images} images in {time.perf_counter() - t:.1f} s", flush=True)
            night = ("incremental", str(tmp / "lake"), str(tmp / "out"), str(args.cpus), args.arch)
            full = run_child(*night)
            print(f"full run       : {full['annotated']} images in {full['wall_s']:.1f} s", flush=True)
            write_images(tmp / "lake", args.images, max(1, args.images // 100))
            inc = run_child(*night)
            print(f"incremental run: {inc['annotated']} new of {inc['listed']} in {inc['wall_s']:.1f} s "
                  f"(ratio {inc['wall_s'] / full['wall_s']:.3f})", flush=True)
            same = run_child(*night)
            print(f"unchanged lake : {same['annotated']} annotated of {same['listed']} in "
                  f"{same['wall_s']:.1f} s (the fixed cost of a night)", flush=True)
        sizes = {}
        for m in (args.objects // 10, args.objects) if args.part in ("all", "diff") else ():
            root = tmp / f"diff{m}"
            root.mkdir()
            write_manifest_and_table(root, m)
            ours = run_child("diff", str(root), str(args.cpus))
            base = run_child("baseline", str(root))
            assert ours["new"] == base["new"] == m // 100, (ours, base)
            sizes[m] = (ours, base)
            print(f"listing + diff of {m} objects: lakelens {m / ours['wall_s']:.0f} objects/s, "
                  f"driver peak RSS {ours['peak_rss'] / 2**20:.0f} MiB; one-process pandas "
                  f"{m / base['wall_s']:.0f} objects/s, peak RSS {base['peak_rss'] / 2**20:.0f} MiB",
                  flush=True)
    nan = {"wall_s": float("nan"), "peak_rss": float("nan")}
    (small, base_small), (large, base_large) = (sizes.get(m, (nan, nan))
                                                for m in (args.objects // 10, args.objects))
    figures = {
        "bench": "nightly", "arch": args.arch, "images": args.images, "objects": args.objects,
        "cpus": args.cpus,
        "full_s": _round(full["wall_s"], 2), "incremental_s": _round(inc["wall_s"], 2),
        "incremental_ratio": _round(inc["wall_s"] / full["wall_s"], 4),
        "incremental_annotated": inc["annotated"], "unchanged_s": _round(same["wall_s"], 2),
        "diff_objects_per_s": _round(args.objects / large["wall_s"]),
        "diff_driver_peak_rss_mib": _round(large["peak_rss"] / 2**20, 1),
        "diff_driver_rss_ratio_10x": _round(large["peak_rss"] / small["peak_rss"], 3),
        "baseline_objects_per_s": _round(args.objects / base_large["wall_s"]),
        "baseline_peak_rss_mib": _round(base_large["peak_rss"] / 2**20, 1),
        "baseline_rss_ratio_10x": _round(base_large["peak_rss"] / base_small["peak_rss"], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
