"""Time to the first committed chunk of a small night, measured from the process start.

A night of a real lake is often small, so what users feel is a run's fixed cost: Python
and Ray start, listing and the diff, the model actors' start, the first commit. This
writes a lake of --images JPEGs and runs `lakelens annotate` (all five tasks, the demo's
tiny architectures with seeded random weights, --num-cpus CPUs) as a fresh process, --runs
times, each into a new table. A watcher in this process polls the table's Delta log and
notes when the first commit holding rows lands (the lock's fence commit holds none).

Printed per run: seconds from spawn to the first committed chunk, to the last one, and to
the process's exit; the median over runs is the figure. The last stdout line is one JSON
object. Usage: python benchmarks/first_chunk.py [--images 100] [--runs 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit  # noqa: E402
from pipelines.demo import ARCHS, IMAGE_SIZE  # noqa: E402
from pipelines.synth import write_lake  # noqa: E402

TASKS = ("detect", "segment", "pose", "semantic", "embed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=None, help="annotate --chunk-size (default its own)")
    p.add_argument("--quick", action="store_true", help="CI sizes: 1 run")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 1
    return args


def commits_with_rows(log_dir: Path, seen: dict[str, float]) -> None:
    """Note (name -> first time seen) every Delta commit in log_dir that adds a data file."""
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        return
    for name in names:
        if name in seen or not name.endswith(".json") or name.startswith("."):
            continue
        try:
            text = (log_dir / name).read_text()
        except OSError:
            continue
        if any(json.loads(line).get("add", {}).get("path", "").endswith(".parquet")
               for line in text.splitlines() if line.strip()):
            seen[name] = time.perf_counter()
        else:
            seen[name] = float("nan")  # a commit without rows (create, fence)


def one_run(lake: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "pipelines.cli", "annotate", str(lake), "--out", str(out),
           "--tasks", ",".join(TASKS), "--weights", "random", "--image-size", str(IMAGE_SIZE),
           "--num-cpus", str(args.num_cpus)]
    for task in TASKS:
        cmd += ["--arch", f"{task}={ARCHS[task]}"]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    seen: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            commits_with_rows(out / "log" / "_delta_log", seen)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    start = time.perf_counter()
    watcher.start()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    commits_with_rows(out / "log" / "_delta_log", seen)
    if proc.returncode != 0:
        raise SystemExit(f"annotate failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    stamps = sorted(t - start for t in seen.values() if t == t)
    runs = sorted((out / "runs").glob("*.json"))
    record = json.loads(runs[-1].read_text()) if runs else {}
    return {"first_chunk_s": round(stamps[0], 2) if stamps else None,
            "last_chunk_s": round(stamps[-1], 2) if stamps else None, "chunks": len(stamps),
            "exit_s": round(wall, 2), "annotated": record.get("counts", {}).get("annotated"),
            "errors": record.get("counts", {}).get("errors"), "run_wall_s": record.get("wall_s"),
            "timeline_s": record.get("timeline_s"),
            "stdout_tail": proc.stdout.strip().splitlines()[-1:] }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="lakelens-first-") as tmp:
        root = Path(tmp)
        write_lake(root / "lake", images=args.images, width=IMAGE_SIZE, height=IMAGE_SIZE)
        for n in range(args.runs):
            r = one_run(root / "lake" / "images", root / f"out-{n}", args)
            print(f"run {n}: {r}", flush=True)
            results.append(r)
    firsts = [r["first_chunk_s"] for r in results if r["first_chunk_s"] is not None]
    line = {"bench": "first_chunk", "images": args.images, "tasks": list(TASKS), "archs": ARCHS,
            "cpus": args.num_cpus, "runs": results,
            "first_chunk_s_median": round(statistics.median(firsts), 2) if firsts else None,
            "exit_s_median": round(statistics.median(r["exit_s"] for r in results), 2),
            "load_avg_1m": round(os.getloadavg()[0], 2)}
    emit(line, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
