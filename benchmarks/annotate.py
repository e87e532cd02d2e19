"""Annotate throughput: a bare single-process torch loop vs the lakelens Ray pipeline.

Both sides get the same synthetic JPEGs (pipelines.synth), the same model (arch, seeded
"random" weights, image size, score threshold, batch size) and the same decode sizes
(pipelines.annotate.decode_sizes).

(a) bare: one process, torch.set_num_threads(--num-cpus); for each file: read the bytes,
    decode_image, collect --batch-size images, call the predictor. Timed: that loop only
    (read + decode + inference); the model is built before the clock starts.
(b) pipeline: pipelines.annotate.run() on a local Ray started with ray.init(num_cpus=...)
    before the clock starts (Ray start-up excluded). Timed around run(), so it includes
    listing, the weights check (a model build) in the driver, actor start-up and model
    build in the actors, read/decode tasks, inference and the Parquet writes.

ratio = pipeline_images_per_s / bare_images_per_s. Above 1: the pipeline beats one process
(decode overlapping inference, several actors). Below 1: its fixed costs and the CPUs it
keeps for read/decode/write tasks (plan_pools) cost more than they return. With few images
the fixed costs dominate; raise --images for a steadier view.

Usage: python benchmarks/annotate.py [--images 64] [--task detect] ...
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from models.decode import decode_image
from models.predict import DetectionPredictor, EmbeddingPredictor
from pipelines import annotate
from pipelines.cluster.local import start_local_ray
from pipelines.cluster.placement import plan_pools
from pipelines.config import AnnotateConfig
from pipelines.synth import write_lake

DEFAULT_ARCHS = {"detect": "fasterrcnn_mobilenet_v3_large_320_fpn", "segment": "maskrcnn_tiny",
                 "pose": "keypointrcnn_tiny", "embed": "resnet18"}
BARE_INCLUDES = "read+decode+inference; not model build"
PIPELINE_INCLUDES = ("listing, output prep, driver weights check (model build), actor start-up "
                     "and model build, read+decode+hash, inference, Parquet writes; "
                     "not Ray start-up")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--task", choices=sorted(DEFAULT_ARCHS), default="detect")
    p.add_argument("--arch", default=None, help="default: a small arch for the task")
    p.add_argument("--image-size", type=int, default=320, help="detectors' shorter side")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--bare-threads", type=int, default=None,
                   help="torch threads of the bare loop (default: --num-cpus)")
    p.add_argument("--width", type=int, default=640, help="synthetic image width")
    p.add_argument("--height", type=int, default=480, help="synthetic image height")
    p.add_argument("--keep", default=None, help="write images and results here, and keep them")
    args = p.parse_args(argv)
    for name in ("images", "batch_size", "num_cpus", "width", "height"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def bare_loop(files: list[Path], cfg: AnnotateConfig,
              threads: int) -> tuple[float, int, tuple[int | None, int | None]]:
    """(seconds, images predicted, (short, long) decode sizes) of the single-process loop."""
    torch.set_num_threads(threads)
    task = cfg.tasks[0]
    arch, weights = cfg.arch_for(task), cfg.weights_for(task)
    predictor: DetectionPredictor | EmbeddingPredictor
    if task == "embed":
        predictor = EmbeddingPredictor(arch, weights=weights, max_batch=cfg.batch_size)
    else:
        predictor = DetectionPredictor(arch, weights=weights, image_size=cfg.image_size,
                                       score_threshold=cfg.score_threshold,
                                       max_batch=cfg.batch_size)
    short, long = annotate.decode_sizes(cfg, [predictor.info])
    done, batch = 0, []
    start = time.perf_counter()
    for path in files:
        dec = decode_image(path.read_bytes(), max_pixels=cfg.max_pixels, short=short, long=long)
        batch.append(dec.pixels)
        if len(batch) == cfg.batch_size:
            done, batch = done + len(predictor(batch)), []
    if batch:
        done += len(predictor(batch))
    return time.perf_counter() - start, done, (short, long)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    arch = args.arch or DEFAULT_ARCHS[args.task]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="lakelens-bench-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        write_lake(root / "lake", images=args.images, width=args.width, height=args.height)
        files = sorted((root / "lake" / "images").glob("*.jpg"))
        cfg = AnnotateConfig(
            sources=(str(root / "lake" / "images"),), out=str(root / "out"), tasks=(args.task,),
            weights={args.task: "random"}, archs={args.task: arch}, image_size=args.image_size,
            batch_size=args.batch_size, num_cpus=args.num_cpus)

        bare_s, bare_n, (short, long) = bare_loop(files, cfg, args.bare_threads or args.num_cpus)
        print(f"bare     : {bare_n} images in {bare_s:.2f} s = {bare_n / bare_s:.2f} images/s "
              f"({args.num_cpus} torch threads, {device})", flush=True)

        start_local_ray(args.num_cpus)
        res = ray.cluster_resources()
        plan = plan_pools(1, res.get("CPU", 1.0), res.get("GPU", 0.0))
        start = time.perf_counter()
        summary = annotate.run(cfg)
        pipe_s = time.perf_counter() - start
        ray.shutdown()
    print(f"pipeline : {summary.listed} images in {pipe_s:.2f} s = {summary.listed / pipe_s:.2f} "
          f"images/s ({summary.annotated} annotated, {summary.errors} errors; pool "
          f"{plan.size} actor(s) x {plan.torch_threads} threads; run() says "
          f"{summary.wall_s:.2f} s)", flush=True)
    bare_ips, pipe_ips = bare_n / bare_s, summary.listed / pipe_s
    print(f"ratio    : {pipe_ips / bare_ips:.3f} (pipeline / bare)", flush=True)
    if summary.annotated != len(files) or bare_n != len(files):
        print(f"warning: expected {len(files)} images on both sides", file=sys.stderr)
    print(json.dumps({
        "bench": "annotate", "images": len(files), "task": args.task, "arch": arch,
        "image_size": None if args.task == "embed" else args.image_size,
        "decode_short": short, "decode_long": long, "width": args.width, "height": args.height,
        "batch_size": args.batch_size, "weights": "random",
        "bare_s": round(bare_s, 3), "bare_images_per_s": round(bare_ips, 3),
        "pipeline_s": round(pipe_s, 3), "pipeline_images_per_s": round(pipe_ips, 3),
        "ratio": round(pipe_ips / bare_ips, 3), "cpus": args.num_cpus, "device": device,
        "bare_torch_threads": args.bare_threads or args.num_cpus, "pipeline_pool": dataclasses.asdict(plan),
        "pipeline_run_wall_s": round(summary.wall_s, 3), "pipeline_annotated": summary.annotated,
        "pipeline_errors": summary.errors, "bare_includes": BARE_INCLUDES,
        "pipeline_includes": PIPELINE_INCLUDES, "torch": torch.__version__, "ray": ray.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
