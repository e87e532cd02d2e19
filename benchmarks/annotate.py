"""Annotate throughput: lakelens vs the pipeline a user writes from Ray's docs vs a bare loop.

Per task (a detector, Mask R-CNN, the embedder; LR-ASPP semantic segmentation on
request), on the same synthetic JPEGs and the same model (the arch built by lakelens's
builder with seeded "random" weights, the same image size, score threshold and batch
size), in one run:

(a) bare: one process, torch threads = --num-cpus; for each file: read, decode
    (lakelens's decode_image at the sizes the model needs), batch, predict. The model is
    built before the clock starts.
(b) docs: the pattern of Ray Data's batch-inference docs, written plainly here:
    `ray.data.read_images` -> `map_batches(Predictor, compute=ActorPoolStrategy(size=CPUs),
    num_cpus=0.5, batch_size=B)` with one torch thread per actor (masks RLE-encoded with
    pycocotools, embeddings as lists) -> `write_parquet`.
(c) lakelens: `pipelines.annotate.run()` into a new table.

(b) and (c) share one local Ray started before the clocks (Ray start-up excluded from
both). "e2e" is images / wall time of the whole job (listing, actor start-up, model builds,
writes included); "steady" is the rate between the 10th and 90th percentile of the times
rows came out (the model actors' output in (b), the driver's commit in (c), batch ends in (a)).

Usage: python benchmarks/annotate.py [--tasks detect,segment,embed] [--images 800] [--quick]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from common import emit  # benchmarks/ is sys.path[0] when run as a script

from models.decode import decode_image
from models.predict import DetectionPredictor, EmbeddingPredictor
from models.semantic import SemanticPredictor
from pipelines import annotate
from pipelines.cluster.local import start_local_ray
from pipelines.config import AnnotateConfig
from pipelines.synth import write_lake

ARCHS = {"detect": "fasterrcnn_mobilenet_v3_large_320_fpn", "segment": "maskrcnn_tiny",
         "embed": "resnet18", "semantic": "lraspp_mobilenet_v3_large"}
SCORE_THRESHOLD = 0.0  # every image carries the model's full quota of boxes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="detect,segment,embed")
    p.add_argument("--images", type=int, default=800, help="per task (default 800; --quick 96)")
    p.add_argument("--quick", action="store_true", help="CI sizes: 96 images")
    p.add_argument("--image-size", type=int, default=320, help="detectors' shorter side")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.images = 96
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in args.tasks:
        if t not in ARCHS:
            p.error(f"--tasks: unknown task {t!r}; choose from {', '.join(ARCHS)}")
    return args


def steady_rate(stamps: list[float]) -> float:
    """Rows per second between the 10th and 90th percentile of output times."""
    t = np.sort(np.asarray(stamps, dtype=np.float64))
    if len(t) < 10:
        return float("nan")
    lo, hi = int(0.1 * len(t)), int(0.9 * len(t))
    return (hi - lo) / max(t[hi] - t[lo], 1e-9)


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
            "steady": round(steady_rate(stamps), 3), "decode": [short, long]}


class DocsPredictor:
    """The docs' callable class: build the model once, predict a batch of decoded images."""

    def __init__(self, task: str, arch: str, image_size: int, score_threshold: float):
        torch.set_num_threads(1)
        self.task = task
        if task == "embed":
            from torchvision.transforms import v2

            from models.embedding import build_embedder

            self.model = build_embedder(arch, weights="random")[0].eval()
            self.transform = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224),
                                         v2.ToDtype(torch.float32, scale=True),
                                         v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        elif task == "semantic":  # torchvision's SemanticSegmentation preset at image_size
            from torchvision.transforms import v2

            from models.semantic import build_semantic

            self.model = build_semantic(arch, weights="random")[0].eval()
            self.transform = v2.Compose([v2.Resize(image_size, antialias=True),
                                         v2.ToDtype(torch.float32, scale=True),
                                         v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        else:
            from models.detection import build_detector

            self.model = build_detector(arch, weights="random", image_size=image_size)[0].eval()
            self.model.roi_heads.score_thresh = score_threshold

    def __call__(self, batch: dict) -> dict:
        from pycocotools import mask as mask_utils

        images = [torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1) for x in batch["image"]]
        out: dict = {"path": batch["path"]}
        with torch.inference_mode():
            if self.task == "embed":
                x = torch.stack([self.transform(im) for im in images])
                out["embedding"] = [e.tolist() for e in self.model(x)]
            elif self.task == "semantic":  # one image at a time: the sizes differ
                out["semantic"] = []
                for im in images:
                    logits = self.model(self.transform(im)[None])["out"]
                    classes = torch.nn.functional.interpolate(
                        logits.argmax(1, keepdim=True).float(), size=im.shape[-2:],
                        mode="nearest")[0, 0].to(torch.uint8).numpy()
                    out["semantic"].append([
                        json.dumps({"label": int(c), "counts": mask_utils.encode(
                            np.asfortranarray(classes == c, dtype=np.uint8))["counts"].decode()})
                        for c in np.unique(classes) if c != 0])
            else:
                preds = self.model([im.float() / 255 for im in images])
                out["boxes"] = [p["boxes"].numpy().tolist() for p in preds]
                out["scores"] = [p["scores"].numpy().tolist() for p in preds]
                out["labels"] = [p["labels"].numpy().tolist() for p in preds]
                if self.task == "segment":
                    out["masks"] = [
                        [json.dumps({"size": r["size"], "counts": r["counts"].decode()})
                         for r in mask_utils.encode(np.asfortranarray(
                             (p["masks"][:, 0] > 0.5).numpy().transpose(1, 2, 0).astype(np.uint8)))]
                        for p in preds]
        out["t"] = [time.time()] * len(images)
        return out


def docs(images_dir: Path, out: Path, task: str, cfg: AnnotateConfig, cpus: int) -> dict:
    start = time.perf_counter()
    t0 = time.time()
    ds = ray.data.read_images(str(images_dir), mode="RGB", include_paths=True)
    ds = ds.map_batches(DocsPredictor, fn_constructor_kwargs={
        "task": task, "arch": cfg.arch_for(task), "image_size": cfg.image_size,
        "score_threshold": cfg.score_threshold},
        compute=ray.data.ActorPoolStrategy(size=cpus), num_cpus=0.5, batch_size=cfg.batch_size)
    ds.write_parquet(str(out))
    wall = time.perf_counter() - start
    import pyarrow.parquet as pq

    stamps = pq.read_table(str(out), columns=["t"]).column("t").to_numpy()
    return {"images": len(stamps), "wall_s": round(wall, 3), "e2e": round(len(stamps) / wall, 3),
            "steady": round(steady_rate(list(stamps - t0)), 3)}


def lakelens(cfg: AnnotateConfig) -> dict:
    start = time.perf_counter()
    summary = annotate.run(cfg)
    wall = time.perf_counter() - start
    return {"images": summary.annotated, "errors": summary.errors, "wall_s": round(wall, 3),
            "e2e": round(summary.annotated / wall, 3), "steady": summary.steady_images_per_s}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    with tempfile.TemporaryDirectory(prefix="lakelens-bench-") as tmp:
        root = Path(tmp)
        write_lake(root / "lake", images=args.images, width=args.width, height=args.height)
        images_dir = root / "lake" / "images"
        files = sorted(images_dir.glob("*.jpg"))
        start_local_ray(args.num_cpus)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            for task in args.tasks:
                cfg = AnnotateConfig(
                    sources=(str(images_dir),), out=str(root / f"out-{task}"), tasks=(task,),
                    weights={task: "random"}, archs={task: ARCHS[task]}, image_size=args.image_size,
                    score_threshold=SCORE_THRESHOLD, batch_size=args.batch_size,
                    num_cpus=args.num_cpus)
                r = {"arch": ARCHS[task], "bare": bare(files, task, cfg, args.num_cpus)}
                print(f"{task} bare    : {r['bare']}", flush=True)
                r["docs"] = docs(images_dir, root / f"docs-{task}", task, cfg, args.num_cpus)
                print(f"{task} docs    : {r['docs']}", flush=True)
                r["lakelens"] = lakelens(cfg)
                print(f"{task} lakelens: {r['lakelens']}", flush=True)
                for kind in ("e2e", "steady"):
                    r[f"vs_docs_{kind}"] = round(r["lakelens"][kind] / r["docs"][kind], 3)
                    r[f"vs_bare_{kind}"] = round(r["lakelens"][kind] / r["bare"][kind], 3)
                print(f"{task} lakelens / docs: e2e {r['vs_docs_e2e']}, steady {r['vs_docs_steady']}; "
                      f"lakelens / bare: e2e {r['vs_bare_e2e']}", flush=True)
                results[task] = r
        finally:
            ray.shutdown()
    line = {"bench": "annotate", "images": args.images, "quick": args.quick, "cpus": args.num_cpus,
            "device": device, "batch_size": args.batch_size, "image_size": args.image_size,
            "width": args.width, "height": args.height, "score_threshold": SCORE_THRESHOLD,
            "weights": "random", "torch": torch.__version__, "ray": ray.__version__,
            "tasks": results}
    emit(line, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
