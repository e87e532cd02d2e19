"""`lakelens demo`: the whole product on one machine, offline.

synth a lake -> Ray Train: detector, segmenter, pose model, semantic U-Net, embedder (tiny
archs, random init, `workers` DDP workers) -> annotate the val lake with the trained weights -> FAISS
index -> image queries -> COCO eval + index Recall@K -> overlays. Prints a table; the last
stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from index.store import SimilarityIndex, open_index
from models.errors import LakelensError

logger = logging.getLogger(__name__)

ARCHS = {"detect": "fasterrcnn_tiny", "segment": "maskrcnn_tiny", "pose": "keypointrcnn_tiny",
         "semantic": "unet_tiny", "embed": "tiny"}
IMAGE_SIZE = 128  # the synthetic images' side: the detectors see them unscaled
SCORE_THRESHOLD = 0.3


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    images: int = 1000
    val_fraction: float = 0.1
    workers: int = 2
    gpu: bool = False
    quick: bool = False  # a few steps of everything: a smoke run, not a demonstration
    detector_epochs: int = 4
    detector_steps: int = 60  # per epoch, per worker (batch 4)
    embedder_epochs: int = 50
    semantic_epochs: int = 8
    semantic_steps: int = 40  # per epoch, per worker (batch 8)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 80:
            raise LakelensError(f"--images must be >= 80 for a meaningful demo, got {self.images}")
        if self.workers < 1:
            raise LakelensError(f"--workers must be >= 1, got {self.workers}")


def _train_configs(cfg: DemoConfig, data: Path, runs: Path) -> dict[str, object]:
    from pipelines.train import TrainConfig

    common = {"data": str(data), "init": "random", "workers": cfg.workers, "gpu": cfg.gpu,
              "seed": cfg.seed, "overwrite": True}
    det_epochs, det_steps = (1, 3) if cfg.quick else (cfg.detector_epochs, cfg.detector_steps)
    out = {task: TrainConfig(kind="detector", task=task, arch=ARCHS[task], out=str(runs / task),
                             epochs=det_epochs, max_steps_per_epoch=det_steps, batch_size=4,
                             image_size=IMAGE_SIZE, **common)
           for task in ("detect", "segment", "pose")}
    sem_epochs, sem_steps = (1, 3) if cfg.quick else (cfg.semantic_epochs, cfg.semantic_steps)
    out["semantic"] = TrainConfig(kind="semantic", task="semantic", arch=ARCHS["semantic"],
                                  out=str(runs / "semantic"), epochs=sem_epochs,
                                  max_steps_per_epoch=sem_steps, batch_size=8,
                                  image_size=IMAGE_SIZE, **common)
    out["embed"] = TrainConfig(kind="embedder", task="embed", arch=ARCHS["embed"],
                               out=str(runs / "embed"), epochs=1 if cfg.quick else cfg.embedder_epochs,
                               max_steps_per_epoch=3 if cfg.quick else None, **common)
    return out


def identities(gt_json: Path) -> dict[str, int]:
    """Real path of each GT image -> its family `identity`."""
    gt = json.loads(gt_json.read_text())
    return {os.path.realpath(gt_json.parent / im["file_name"]): im["identity"] for im in gt["images"]}


def _family(identity: dict[str, int], uri: str) -> int | None:
    return identity.get(os.path.realpath(uri.removeprefix("file://")))


def index_recall(index: SimilarityIndex, identity: dict[str, int],
                 ks: tuple[int, ...] = (1, 4)) -> dict[str, float]:
    """Recall@K of the index itself: each val image queries the index (itself left out);
    a hit is a neighbour of the same image family."""
    import pyarrow as pa

    from index.evaluate import recall_of_neighbors

    uris = dict(zip(index.live_image_ids(), index.ids.uris.filter(pa.array(index.live)).to_pylist(),
                    strict=True))
    ids = [i for i in uris if _family(identity, uris[i]) is not None]
    if len(ids) <= max(ks):
        raise LakelensError(f"only {len(ids)} indexed images are in the val split; cannot score recall")
    position = {i: n for n, i in enumerate(ids)}
    labels = [_family(identity, uris[i]) for i in ids]
    found = index.search_ids(ids, k=max(ks) + 1)
    neighbors = [[position[j] for j in row if j != query and j in position]
                 for query, row in zip(ids, found.image_ids, strict=True)]
    recall = recall_of_neighbors(labels, neighbors, ks)
    return {f"recall@{k}": v for k, v in recall.items()}


def embedding_metrics(results: str, identity: dict[str, int]) -> dict[str, float]:
    """Recall@1, MAP@R and R-precision of the table's embeddings of the val images (exact
    search over them, by pytorch-metric-learning): what the embedder learned, apart from
    what the ANN index loses."""
    import numpy as np

    from models.metric import retrieval_metrics
    from pipelines.lake.table import open_table

    table = open_table(results).current_table(["uri", "embedding"])
    pairs = [(e, _family(identity, u)) for u, e in zip(table.column("uri").to_pylist(),
                                                      table.column("embedding").to_pylist(), strict=True)
             if e is not None and _family(identity, u) is not None]
    if len(pairs) < 2:
        raise LakelensError(f"only {len(pairs)} val images have embeddings; cannot score them")
    emb = np.asarray([e for e, _ in pairs], np.float32)
    return retrieval_metrics(emb, np.asarray([f for _, f in pairs]), ks=(1,))


def run(cfg: DemoConfig) -> dict:
    from pipelines import annotate, indexing, train
    from pipelines.coco import evaluate
    from pipelines.config import AnnotateConfig
    from pipelines.render import render
    from pipelines.synth import write_dataset

    started = time.perf_counter()
    out = Path(cfg.out)
    for sub in ("lake", "runs", "annotations", "index", "overlays"):
        shutil.rmtree(out / sub, ignore_errors=True)
    timings: dict[str, float] = {}

    def step(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[demo] {name} done in {timings[name]:.0f} s", flush=True)

    t0 = time.perf_counter()
    train_json, val_json = write_dataset(out / "lake", images=cfg.images, seed=cfg.seed,
                                         val_fraction=cfg.val_fraction)
    step("synth", t0)
    models: dict[str, str] = {}
    trained: dict[str, dict] = {}
    for task, tcfg in _train_configs(cfg, out / "lake", out / "runs").items():
        t0 = time.perf_counter()
        print(f"[demo] training {task} ({tcfg.model_arch}) with Ray Train, {cfg.workers} workers",
              flush=True)
        summary = train.run(tcfg)
        models[task] = summary.model
        trained[task] = summary.best
        step(f"train {task}", t0)
    t0 = time.perf_counter()
    acfg = AnnotateConfig(sources=(str(val_json.parent / "images"),), out=str(out / "annotations"),
                          tasks=tuple(models), weights=models, score_threshold=SCORE_THRESHOLD,
                          batch_size=8, full=True)
    ann = annotate.run(acfg)
    print(ann.describe(), flush=True)
    step("annotate", t0)
    t0 = time.perf_counter()
    indexing.build(indexing.IndexBuildConfig(results=acfg.out, out=str(out / "index")))
    index, identity = open_index(out / "index"), identities(val_json)
    recall = index_recall(index, identity)
    embedded = embedding_metrics(acfg.out, identity)
    step("index", t0)
    t0 = time.perf_counter()
    report = evaluate(acfg.out, str(val_json))
    written, _ = render(acfg.out, str(out / "overlays"), limit=16)
    step("eval and render", t0)
    _show_queries(index, identity)

    stats = {t: v["stats"] for t, v in report["tasks"].items()}

    def stat(iou_type: str, name: str) -> float:
        return float(stats.get(iou_type, {}).get(name, 0.0))  # no predictions at all: 0

    figures = {
        "box_AP": stat("bbox", "AP"), "box_AP50": stat("bbox", "AP50"),
        "mask_AP": stat("segm", "AP"), "mask_AP50": stat("segm", "AP50"),
        "keypoint_AP": stat("keypoints", "AP"), "keypoint_AP50": stat("keypoints", "AP50"),
        "semantic_mIoU": stat("semantic", "mean_iou"),
        "semantic_pixel_accuracy": stat("semantic", "pixel_accuracy"),
        "semantic_fwIoU": stat("semantic", "fw_iou"),
        "recall@1": recall["recall@1"], "recall@4": recall["recall@4"],
        "embed_recall@1": embedded["recall@1"], "embed_map@r": embedded["map@r"],
        "embed_r_precision": embedded["r_precision"],
        "annotate_images_per_s": round(ann.images_per_s, 2),
    }
    figures = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}
    result = figures | {"val_images": ann.listed, "train_images": cfg.images - ann.listed,
                        "workers": cfg.workers, "quick": cfg.quick, "timings_s": timings,
                        "wall_s": round(time.perf_counter() - started, 1),
                        "outputs": {"annotations": acfg.out, "index": str(out / "index"),
                                    "overlays": str(out / "overlays"), "models": models}}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    _print_table(figures, result, written)
    print(json.dumps(result), flush=True)
    return result


def _show_queries(index: SimilarityIndex, identity: dict[str, int], n: int = 3) -> None:
    """A few query-by-image searches, as `lakelens query --image` runs them."""
    paths = list(identity)[:n]
    found = index.search_images(paths, k=4)
    for path, uris in zip(paths, found.uris, strict=True):
        marks = ["same family" if _family(identity, u) == _family(identity, path) else "other"
                 for u in uris[1:]]
        print(f"[demo] query {os.path.basename(path)}: "
              + ", ".join(f"{os.path.basename(u)} ({m})" for u, m in zip(uris[1:], marks, strict=True)),
              flush=True)


def _print_table(figures: dict, result: dict, overlays: int) -> None:
    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [("box AP / AP50", f"{fmt(figures['box_AP'])} / {fmt(figures['box_AP50'])}"),
            ("mask AP / AP50", f"{fmt(figures['mask_AP'])} / {fmt(figures['mask_AP50'])}"),
            ("keypoint AP / AP50", f"{fmt(figures['keypoint_AP'])} / {fmt(figures['keypoint_AP50'])}"),
            ("semantic mIoU / pixel acc / fwIoU", f"{fmt(figures['semantic_mIoU'])} / "
             f"{fmt(figures['semantic_pixel_accuracy'])} / {fmt(figures['semantic_fwIoU'])}"),
            ("embedder Recall@1 / MAP@R / R-precision", f"{fmt(figures['embed_recall@1'])} / "
             f"{fmt(figures['embed_map@r'])} / {fmt(figures['embed_r_precision'])}"),
            ("index Recall@1 / @4", f"{fmt(figures['recall@1'])} / {fmt(figures['recall@4'])}"),
            ("annotate images/s", fmt(figures["annotate_images_per_s"])),
            ("wall time", f"{result['wall_s']:.0f} s")]
    width = max(len(r[0]) for r in rows)
    print("\nlakelens demo (val split: held-out image families)")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")
    outs = result["outputs"]
    runs = Path(outs["models"]["detect"]).parent.parent
    print(f"  results: {outs['annotations']}  index: {outs['index']}  "
          f"overlays ({overlays}): {outs['overlays']}  models: {runs}")
