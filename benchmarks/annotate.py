"""Annotate throughput from process start: lakelens vs Ray Data's docs pattern vs Daft 0.7.

Per task (a detector, Mask R-CNN, the embedder, LR-ASPP semantic segmentation) and lake
size (synthetic 640x480 JPEGs), every pipeline runs the same model (the arch built by
lakelens's builder with seeded "random" weights) at the same image size, score threshold
and batch size:

(a) docs: benchmarks/baselines/ray_docs.py, the pattern of Ray Data's batch-inference
    docs written plainly: `ray.init(num_cpus=N)` (a fresh local Ray) -> `read_images` ->
    `map_batches(callable class, compute=ActorPoolStrategy(size=N), num_cpus=0.5,
    batch_size=B)`, one torch thread per actor -> `write_parquet`.
(b) daft: benchmarks/baselines/daft_udf.py, the pattern of Daft 0.7's docs on its native
    runner (one process): `from_glob_path(DIR/*.jpg)` -> `col("path").download()
    .decode_image(mode="RGB")` -> a `@daft.cls(max_concurrency=N)` model class with a
    `@daft.method.batch(batch_size=B)` method (N instances, one torch thread each) ->
    `write_deltalake`. Skipped, with a note in the JSON, where daft cannot be imported.
(c) lakelens: the real CLI, `python -m pipelines.cli annotate LAKE --out OUT --tasks T ...
    --num-cpus N` (its own local Ray), into a new table.
(d) bare: a reference loop in this process (read, decode with lakelens's decode_image,
    batch, predict; torch threads = N); the model is built before the clock starts.

(a), (b) and (c) each run as a fresh subprocess and are timed from spawn to exit: imports,
Ray start-up (for the Ray-based ones), listing, model builds, writes and shutdown all
count. "e2e" is images / that wall time. "steady" is the rate between the 10th and 90th
percentile of when rows came out of the model (per-row stamps in (a) and (b), the model
actors' 1 s bins in lakelens's run record for (c), batch ends in (d)); "first_output_s"
is when the first model batch was done, in seconds from spawn (for lakelens the start of
its 1 s bin); "first_commit_s" when the first Delta commit landed ((b), (c)).

Target (issue 23): lakelens e2e / the better of docs and daft e2e >= 1.1 at 384 and 800
images, for each task (`vs_best_baseline_e2e`, `meets_target`).

Usage: python benchmarks/annotate.py [--tasks detect,segment,embed,semantic]
       [--sizes 384,800] [--quick] [--num-cpus N] [--daft-path DIR] [--out FILE]
The last stdout line is one JSON object; the exit status is 1 when a pipeline failed or
the pipelines disagree on the number of images.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where "index" would name
# benchmarks/index.py instead of the lakelens package: the checkout's root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from models.decode import decode_image  # noqa: E402
from models.predict import DetectionPredictor, EmbeddingPredictor  # noqa: E402
from models.semantic import SemanticPredictor  # noqa: E402
from pipelines import annotate  # noqa: E402
from pipelines.config import AnnotateConfig  # noqa: E402
from pipelines.synth import write_lake  # noqa: E402

ARCHS = {"detect": "fasterrcnn_mobilenet_v3_large_320_fpn", "segment": "maskrcnn_tiny",
         "embed": "resnet18", "semantic": "lraspp_mobilenet_v3_large"}
SCORE_THRESHOLD = 0.0  # every image carries the model's full quota of boxes
TARGET = 1.1  # lakelens e2e / the better baseline's e2e
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# daft 0.7.26 needs pyarrow < 26: it goes in a directory of its own, not lakelens's venv
DAFT_INSTALL = ("pip install --no-deps --target .daft-site daft==0.7.26 pyiceberg==0.12.0 pyarrow==25.0.1 "
                "cachetools pyroaring rich strictyaml tenacity tqdm zstandard markdown-it-py mdurl, "
                "then --daft-path .daft-site")
DAFT_MISSING = f"daft not importable: {DAFT_INSTALL}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="detect,segment,embed,semantic")
    p.add_argument("--sizes", default="384,800", help="images per lake, comma-separated (--quick: 48)")
    p.add_argument("--quick", action="store_true", help="CI size: one lake of 48 images")
    p.add_argument("--image-size", type=int, default=320, help="detectors' shorter side")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--daft-path", default=None,
                   help="a directory put first on the Daft baseline's PYTHONPATH (e.g. a `pip install "
                        "--target` of daft and its pyarrow) where daft is not in this environment")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per pipeline run")
    p.add_argument("--no-bare", action="store_true",
                   help="skip the bare reference loop (its N intra-op threads crawl on a shared machine)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = "48"
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes: integers, comma-separated, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 1:
        p.error(f"--sizes: positive integers, got {args.sizes}")
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in args.tasks:
        if t not in ARCHS:
            p.error(f"--tasks: unknown task {t!r}; choose from {', '.join(ARCHS)}")
    return args


def steady_rate(stamps) -> float | None:
    """Rows per second between the 10th and 90th percentile of output times."""
    t = np.sort(np.asarray(stamps, dtype=np.float64))
    if len(t) < 10:
        return None
    lo, hi = int(0.1 * len(t)), int(0.9 * len(t))
    if t[hi] <= t[lo]:
        return None
    return round((hi - lo) / (t[hi] - t[lo]), 3)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# --- (d) bare ---------------------------------------------------------------------------

def predictor_for(task: str, cfg: AnnotateConfig):
    arch = cfg.arch_for(task)
    if task == "embed":
        return EmbeddingPredictor(arch, weights="random", max_batch=cfg.batch_size)
    if task == "semantic":
        return SemanticPredictor(arch, weights="random", image_size=cfg.image_size,
                                 max_batch=cfg.batch_size)
    return DetectionPredictor(arch, weights="random", image_size=cfg.image_size,
                              score_threshold=cfg.score_threshold, max_batch=cfg.batch_size)


def bare(files: list[Path], task: str, cfg: AnnotateConfig, threads: int) -> dict:
    torch.set_num_threads(threads)
    predictor = predictor_for(task, cfg)
    short, long = annotate.decode_sizes(cfg, [predictor.info])
    stamps, batch = [], []
    start = time.perf_counter()
    for path in files:
        batch.append(decode_image(path.read_bytes(), max_pixels=cfg.max_pixels, short=short,
                                  long=long).pixels)
        if len(batch) == cfg.batch_size:
            predictor(batch)
            stamps += [time.perf_counter()] * len(batch)
            batch = []
    if batch:
        predictor(batch)
        stamps += [time.perf_counter()] * len(batch)
    wall = time.perf_counter() - start
    return {"images": len(stamps), "wall_s": round(wall, 3), "e2e": round(len(stamps) / wall, 3),
            "steady": steady_rate(stamps), "first_output_s": round(stamps[0] - start, 3),
            "decode": [short, long]}


# --- subprocesses -----------------------------------------------------------------------

def child_env(first: str | None = None) -> dict[str, str]:
    """This environment, with this checkout first on the path (after `first`), no Ray
    cluster to join, and no usage reporting (nothing may wait on a network)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    paths = [p for p in (first, str(REPO), env.get("PYTHONPATH")) if p]
    env.update(PYTHONPATH=os.pathsep.join(paths), RAY_USAGE_STATS_ENABLED="0", DO_NOT_TRACK="1")
    return env


def spawn(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> dict:
    """Run `cmd` to its exit; wall time from spawn to exit. Its output goes to `log`."""
    with open(log, "wb") as f:
        t_spawn = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and the Ray processes it started
            proc.wait()
            rc = None
        wall = time.perf_counter() - start
    run = {"t_spawn": t_spawn, "wall_s": round(wall, 3)}
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        run["error"] = (f"timed out after {timeout:.0f} s" if rc is None else f"exit {rc}") + \
            f" (log {log}): " + " | ".join(tail)
    return run


def first_commit_s(table: Path, t_spawn: float, key: str | None = None) -> float | None:
    """Seconds from spawn to the table's first commit (the first with `key` in its commit
    info where given), from the table's own log."""
    from deltalake import DeltaTable

    times = [h["timestamp"] / 1000 for h in DeltaTable(str(table)).history() if key is None or key in h]
    return round(min(times) - t_spawn, 3) if times else None


def rows_result(run: dict, stamps: np.ndarray, workers: int) -> dict:
    n = len(stamps)
    return {"images": n, "wall_s": run["wall_s"], "e2e": round(n / run["wall_s"], 3),
            "steady": steady_rate(stamps),
            "first_output_s": round(float(stamps.min()) - run["t_spawn"], 3) if n else None,
            "workers": workers}


def model_args(task: str, cfg: AnnotateConfig) -> list[str]:
    return ["--task", task, "--arch", cfg.arch_for(task), "--cpus", str(cfg.num_cpus),
            "--batch-size", str(cfg.batch_size), "--image-size", str(cfg.image_size),
            "--score-threshold", str(cfg.score_threshold)]


def docs(images_dir: Path, out: Path, task: str, cfg: AnnotateConfig, timeout: float) -> dict:
    cmd = [sys.executable, str(BENCH / "baselines" / "ray_docs.py"), str(images_dir), str(out),
           *model_args(task, cfg)]
    run = spawn(cmd, child_env(), out.with_suffix(".log"), timeout)
    if "error" in run:
        return run
    import pyarrow.parquet as pq

    t = pq.read_table(str(out), columns=["t", "pid"])
    return rows_result(run, t.column("t").to_numpy(), len(set(t.column("pid").to_pylist())))


def daft_version(daft_path: str | None) -> str | None:
    """The daft the Daft baseline would import (None when it cannot: the baseline is skipped)."""
    probe = subprocess.run([sys.executable, "-c", "import daft, deltalake; print(daft.__version__)"],
                           env=child_env(daft_path), capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def daft(images_dir: Path, out: Path, task: str, cfg: AnnotateConfig, timeout: float,
         daft_path: str | None) -> dict:
    cmd = [sys.executable, str(BENCH / "baselines" / "daft_udf.py"), str(images_dir), str(out),
           *model_args(task, cfg)]
    run = spawn(cmd, child_env(daft_path), out.with_suffix(".log"), timeout)
    if "error" in run:
        return run
    from deltalake import DeltaTable

    t = DeltaTable(str(out)).to_pyarrow_table(columns=["t", "pid", "tid"])  # a real Delta table
    result = rows_result(run, t.column("t").to_numpy(), len(set(zip(
        t.column("pid").to_pylist(), t.column("tid").to_pylist(), strict=True))))
    result["processes"] = len(set(t.column("pid").to_pylist()))
    result["first_commit_s"] = first_commit_s(out, run["t_spawn"])
    return result


def lakelens(images_dir: Path, out: Path, task: str, cfg: AnnotateConfig, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pipelines.cli", "annotate", str(images_dir), "--out", str(out),
           "--tasks", task, "--arch", f"{task}={cfg.arch_for(task)}", "--weights", f"{task}=random",
           "--image-size", str(cfg.image_size), "--score-threshold", str(cfg.score_threshold),
           "--batch-size", str(cfg.batch_size), "--num-cpus", str(cfg.num_cpus)]
    run = spawn(cmd, child_env(), out.with_suffix(".log"), timeout)
    if "error" in run:
        return run
    (record_path,) = (out / "runs").glob("*.json")
    record = json.loads(record_path.read_text())
    n = record["counts"]["annotated"]
    actors = record["actors"]
    done = [int(k) for a in actors for k in a.get("done", {})]
    started = [a["first_batch_at"] for a in actors if "first_batch_at" in a]
    return {"images": n, "errors": record["counts"]["errors"], "wall_s": run["wall_s"],
            "e2e": round(n / run["wall_s"], 3), "steady": record["steady_images_per_s"],
            "first_output_s": round(min(done) - run["t_spawn"], 3) if done else None,
            "first_output_bin_s": max((a.get("done_bin_s", 1) for a in actors), default=None),
            "first_batch_start_s": round(min(started) - run["t_spawn"], 3) if started else None,
            "first_commit_s": first_commit_s(out / "log", run["t_spawn"], key="lakelens.chunk"),
            "run_wall_s": record["wall_s"], "workers": len(actors), "chunks": record["chunks"]}


# --- the run ----------------------------------------------------------------------------

def compare(r: dict) -> None:
    """Ratios of lakelens to each baseline (None where one is missing)."""
    ll = r["lakelens"]
    for name in ("docs", "daft", "bare"):
        for kind in ("e2e", "steady"):
            r[f"vs_{name}_{kind}"] = ratio(ll.get(kind), r[name].get(kind))
    baselines = {k: r[k]["e2e"] for k in ("docs", "daft") if r[k].get("e2e")}
    r["best_baseline"] = max(baselines, key=baselines.get) if baselines else None
    r["vs_best_baseline_e2e"] = ratio(ll.get("e2e"), max(baselines.values())) if baselines else None
    r["meets_target"] = (r["vs_best_baseline_e2e"] >= TARGET
                         if r["vs_best_baseline_e2e"] is not None else None)
    counts = {k: r[k]["images"] for k in ("bare", "docs", "daft", "lakelens") if "images" in r[k]}
    r["images_agree"] = len(set(counts.values())) == 1 and r["images"] in counts.values()


def describe(task: str, size: int, name: str, res: dict) -> str:
    head = f"{task} {size:>4} {name:8}:"
    if "skipped" in res or "error" in res:
        return f"{head} {res.get('skipped') or res.get('error')}"
    extra = "".join(f", {k} {res[k]}" for k in ("first_commit_s", "workers") if res.get(k) is not None)
    return (f"{head} {res['images']} images in {res['wall_s']} s: e2e {res['e2e']} images/s, "
            f"steady {res['steady']}, first output {res['first_output_s']} s{extra}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    daft_ver = daft_version(args.daft_path)
    if daft_ver is None:
        print(f"Daft baseline skipped: {DAFT_MISSING}", flush=True)
    results: dict[str, dict] = {t: {"arch": ARCHS[t], "sizes": {}} for t in args.tasks}
    ok = True
    with tempfile.TemporaryDirectory(prefix="lakelens-bench-") as tmp:
        root = Path(tmp)
        for size in args.sizes:
            lake = root / f"lake-{size}"
            write_lake(lake, images=size, width=args.width, height=args.height)
            images_dir = lake / "images"
            files = sorted(images_dir.glob("*.jpg"))
            for task in args.tasks:
                cfg = AnnotateConfig(
                    sources=(str(images_dir),), out=str(root / f"lakelens-{task}-{size}"), tasks=(task,),
                    weights={task: "random"}, archs={task: ARCHS[task]}, image_size=args.image_size,
                    score_threshold=SCORE_THRESHOLD, batch_size=args.batch_size, num_cpus=args.num_cpus)
                r: dict = {"images": size, "bare": {"skipped": "--no-bare"} if args.no_bare
                           else bare(files, task, cfg, args.num_cpus)}
                print(describe(task, size, "bare", r["bare"]), flush=True)
                r["docs"] = docs(images_dir, root / f"docs-{task}-{size}", task, cfg, args.timeout_s)
                print(describe(task, size, "docs", r["docs"]), flush=True)
                r["daft"] = ({"skipped": DAFT_MISSING} if daft_ver is None else
                             daft(images_dir, root / f"daft-{task}-{size}", task, cfg, args.timeout_s,
                                  args.daft_path))
                print(describe(task, size, "daft", r["daft"]), flush=True)
                r["lakelens"] = lakelens(images_dir, root / f"lakelens-{task}-{size}", task, cfg,
                                         args.timeout_s)
                print(describe(task, size, "lakelens", r["lakelens"]), flush=True)
                compare(r)
                failed = any("error" in r[k] for k in ("docs", "daft", "lakelens"))
                ok = ok and r["images_agree"] and not failed
                print(f"{task} {size:>4} lakelens / best baseline ({r['best_baseline']}): e2e "
                      f"{r['vs_best_baseline_e2e']} (target {TARGET}); / docs: e2e {r['vs_docs_e2e']}, "
                      f"steady {r['vs_docs_steady']}; / daft: e2e {r['vs_daft_e2e']}, steady "
                      f"{r['vs_daft_steady']}; / bare: e2e {r['vs_bare_e2e']}", flush=True)
                results[task]["sizes"][str(size)] = r
    verdicts = [r["meets_target"] for t in results.values() for r in t["sizes"].values()]
    line = {"bench": "annotate", "sizes": args.sizes, "quick": args.quick, "cpus": args.num_cpus,
            "device": device, "batch_size": args.batch_size, "image_size": args.image_size,
            "width": args.width, "height": args.height, "score_threshold": SCORE_THRESHOLD,
            "weights": "random", "timed": "spawn to exit, one fresh process per pipeline run",
            "target_vs_best_baseline_e2e": TARGET,
            "meets_target": all(verdicts) if verdicts and None not in verdicts else None,
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "ray": metadata.version("ray"), "daft": daft_ver,
                         "deltalake": metadata.version("deltalake")},
            "daft_runner": "native: @daft.cls(max_concurrency=cpus), one torch thread per instance",
            "tasks": results}
    emit(line, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
