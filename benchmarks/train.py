"""Training throughput: a bare single-process torch loop on images already in memory vs
`lakelens train` (Ray Train, DDP workers reading and decoding through DataLoaders).

Both sides train the same model (arch, random init, image size, batch size per step per
process, AdamW) on the same synthetic dataset (pipelines.synth.write_dataset).

(a) bare: one process, torch.set_num_threads(--num-cpus), every training image decoded
    into memory before the clock starts (no data loading at all), --steps steps of
    --batch-size images. Timed: forward, backward and the optimiser step.
(b) pipeline: pipelines.train.run() with --workers workers of --num-cpus/--workers CPUs,
    one epoch of --steps steps per worker. The figure is the workers' own in-epoch
    throughput (sum over workers; it includes reading and decoding through the
    DataLoader, DDP gradient all-reduce, and excludes validation); wall time (Ray start,
    worker start, validation, checkpointing) is printed beside it.

ratio = pipeline_images_per_s / bare_images_per_s. Near or above 1: data loading keeps up
and DDP scales over the cores; well below 1: loading or synchronisation is a bottleneck.

Usage: python benchmarks/train.py [--task detect] [--steps 40] [--workers 2]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if sys.path and os.path.basename(sys.path[0]) == "benchmarks":
    sys.path.pop(0)  # run as a script: the repo's packages, not this folder's names

import ray
import torch

from models.detection import build_for_training
from pipelines import train
from pipelines.cluster.local import start_local_ray
from pipelines.synth import write_dataset
from pipelines.train.datasets import DetectionDataset, split_paths

ARCHS = {"detect": "fasterrcnn_tiny", "segment": "maskrcnn_tiny", "pose": "keypointrcnn_tiny"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(ARCHS), default="detect")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--steps", type=int, default=40, help="steps per process")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    return p.parse_args(argv)


def bare(data: Path, args: argparse.Namespace) -> float:
    torch.set_num_threads(args.num_cpus)
    ds = DetectionDataset(split_paths(str(data))["train"], args.task, train=False)
    items = [ds[i] for i in range(min(len(ds), args.steps * args.batch_size))]
    model, _ = build_for_training(ARCHS[args.task], init="random", num_classes=ds.vocab.num_classes,
                                  num_keypoints=len(ds.vocab.keypoint_names), image_size=args.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    for step in range(args.steps):
        batch = [items[(step * args.batch_size + j) % len(items)] for j in range(args.batch_size)]
        loss = sum(model([im for im, _ in batch], [t for _, t in batch]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return args.steps * args.batch_size / (time.perf_counter() - started)


def pipeline(data: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    cfg = train.TrainConfig(kind="detector", task=args.task, arch=ARCHS[args.task], init="random",
                            data=str(data), out=str(out), workers=args.workers, epochs=1,
                            cpus_per_worker=args.num_cpus / args.workers,
                            max_steps_per_epoch=args.steps, batch_size=args.batch_size,
                            image_size=args.image_size, overwrite=True)
    started = time.perf_counter()
    train.run(cfg)
    wall = time.perf_counter() - started
    history = json.loads((out / train.METRICS_FILE).read_text())["history"]
    return history[0]["throughput"] * args.workers, wall


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_dataset(data, images=args.images, seed=0, val_fraction=0.1,
                      width=args.image_size, height=args.image_size)
        bare_ips = bare(data, args)
        print(f"bare loop ({args.num_cpus} threads, images in memory): {bare_ips:.2f} images/s",
              flush=True)
        start_local_ray(args.num_cpus)
        try:
            pipe_ips, wall = pipeline(data, Path(tmp) / "run", args)
        finally:
            ray.shutdown()
    ratio = pipe_ips / bare_ips
    print(f"lakelens train ({args.workers} workers): {pipe_ips:.2f} images/s in-epoch "
          f"(wall {wall:.1f} s incl. start-up and validation); ratio {ratio:.3f}")
    print(json.dumps({"bench": "train", "task": args.task, "arch": ARCHS[args.task],
                      "steps_per_process": args.steps, "batch_size": args.batch_size,
                      "image_size": args.image_size, "cpus": args.num_cpus, "workers": args.workers,
                      "bare_images_per_s": round(bare_ips, 3),
                      "pipeline_images_per_s": round(pipe_ips, 3), "ratio": round(ratio, 3),
                      "pipeline_wall_s": round(wall, 1), "device": "cpu"}))


if __name__ == "__main__":
    main()
