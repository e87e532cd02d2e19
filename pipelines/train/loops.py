"""The per-worker training loops Ray Train runs (one process per `--workers`).

Each rank reads its own shard of the training set (DistributedSampler for detectors,
its own P x K batches for embedders) through DataLoader worker processes, so decoding
and augmentation overlap compute. Validation is sharded the same way; rank 0 scores the
gathered predictions (COCOeval or Recall@K) and every rank reports the same numbers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, DistributedSampler

from models.device import autocast
from models.errors import LakelensError
from models.metric import MetricLoss
from pipelines import version
from pipelines.cluster.weights import install_shipped
from pipelines.train.config import TrainConfig
from pipelines.train.datasets import (
    DetectionDataset,
    EmbedDataset,
    SemanticDataset,
    collate,
    contiguous_labels,
    embed_items,
    loader_workers,
    split_paths,
)
from pipelines.train.worker import (
    LR_FLOOR,
    gather,
    lr_schedule,
    mean_across,
    restore,
    save_and_report,
    world,
)

logger = logging.getLogger(__name__)

IOU_TYPES = {"detect": ("bbox",), "segment": ("bbox", "segm"), "pose": ("bbox", "keypoints")}
PRIMARY = {"detect": "bbox_AP", "segment": "segm_AP", "pose": "keypoints_AP", "embed": "recall@1",
           "semantic": "mean_iou"}
KEPT_STATS = ("AP", "AP50", "AP75")
RECALL_KS = (1, 2, 4, 8)
GRAD_CLIP = 10.0


def _setup(config: dict) -> tuple[TrainConfig, torch.device, int, int]:
    import ray.train.torch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for pkg in ("pipelines", "models", "index"):
        logging.getLogger(pkg).setLevel(logging.INFO)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    _quiet_ray_train()
    config = dict(config)
    install_shipped(config.pop("weights_files", None))
    cfg = TrainConfig(**config)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    rank, size = world()
    torch.manual_seed(cfg.seed * 1000 + rank)
    return cfg, ray.train.torch.get_device(), rank, size


def _quiet_ray_train() -> None:
    """Ray Train logs a "Reporting training result ..." line per rank per report at INFO,
    under a logger named by its file's path; lakelens prints its own epoch lines."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class _Stepper:
    """One optimiser step: autocast on GPU (GradScaler for fp16), gradient clipping (each
    parameter group on its own, so a loss's proxies do not shrink the model's step), a
    clear error when the loss stops being finite."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device):
        self.optimizer, self.scheduler = optimizer, scheduler
        fp16 = device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    def __call__(self, loss: torch.Tensor, epoch: int, step: int) -> float:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise LakelensError(f"the loss became {value} at epoch {epoch + 1}, step {step + 1}; "
                                "lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        for group in self.optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return value


def _optimizer(model: torch.nn.Module, loss: MetricLoss | None, cfg: TrainConfig,
               steps_per_epoch: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.SequentialLR]:
    """AdamW with the model's parameters in group 0 and, for a loss that owns parameters
    (proxies, class weights), those in group 1 at `loss.lr_scale` times the LR; one
    warm-up + cosine schedule (`lr_schedule`) over both."""
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
    own = [p for p in loss.parameters() if p.requires_grad] if loss is not None else []
    if own:
        groups.append({"params": own, "lr": cfg.learning_rate * loss.lr_scale})
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return opt, lr_schedule(opt, steps_per_epoch * cfg.epochs, floor=LR_FLOOR * cfg.learning_rate)


def _prepare_loss(loss: MetricLoss | None) -> torch.nn.Module | None:
    """A loss that owns parameters goes through DDP, like the model, rather than having
    its gradients all-reduced by hand: DDP broadcasts rank 0's values when it wraps (each
    rank seeds torch differently, so their random proxies differ) and averages their
    gradients in backward, so with the same optimiser steps they stay identical on every
    rank. DDP refuses a module without parameters: those run as they are."""
    import ray.train.torch

    if loss is None or not any(p.requires_grad for p in loss.parameters()):
        return loss
    return ray.train.torch.prepare_model(loss)


def _check_same_on_every_rank(loss: MetricLoss | None) -> None:
    if loss is None or not any(True for _ in loss.parameters()):
        return
    sums = gather(float(sum(p.detach().double().sum() for p in loss.parameters())))
    assert all(v == sums[0] for v in sums), f"the loss's parameters differ across ranks: {sums}"


def _loader_kwargs(cfg: TrainConfig, device: torch.device) -> dict:
    n = loader_workers(cfg.loader_workers, cfg.cpus_per_worker)
    return {"num_workers": n, "persistent_workers": n > 0, "pin_memory": device.type == "cuda"}


def _log_epoch(rank: int, cfg: TrainConfig, entry: dict) -> None:
    if rank == 0:
        val = ", ".join(f"{k} {v:.3f}" for k, v in entry["val"].items())
        logger.info("epoch %d/%d: loss %.4f, %.1f %s/s/worker, val: %s", entry["epoch"], cfg.epochs,
                    entry["loss"], entry["throughput"], "images" if cfg.kind == "detector" else "examples",
                    val)


def _fit(cfg: TrainConfig, model: torch.nn.Module, loader: DataLoader, sampler: Any,
         device: torch.device, rank: int, meta: dict,
         forward: Callable[[torch.nn.Module, torch.nn.Module | None, Any], tuple[torch.Tensor, int]],
         evaluate: Callable[[], dict[str, float]], primary: str, loss: MetricLoss | None = None) -> None:
    """The epochs every loop shares: restore, DDP-wrap, train `steps` steps an epoch
    (`forward(ddp_model, ddp_loss, batch) -> (loss, examples)`; `loss`, on the device, is
    the embedder's loss module, None for detectors), validate, checkpoint, report. Each
    history entry records `lr`: the model's LR when the epoch ends."""
    import ray.train.torch

    steps = min(len(loader), cfg.max_steps_per_epoch or len(loader))
    opt, sched = _optimizer(model, loss, cfg, steps)
    ws, best = restore(model, opt, sched, loss, steps_per_epoch=steps, epochs=cfg.epochs)
    ddp = ray.train.torch.prepare_model(model)
    ddp_loss = _prepare_loss(loss)
    stepper = _Stepper(opt, sched, device)
    for epoch in range(ws.epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        started, losses, seen = time.perf_counter(), [], 0
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            value, n = forward(ddp, ddp_loss, batch)
            losses.append(stepper(value, epoch, step))
            seen += n
        throughput = seen / (time.perf_counter() - started)
        val = evaluate()
        ws.epoch = epoch + 1
        ws.history.append({"epoch": epoch + 1, "loss": mean_across(float(np.mean(losses))),
                           "val": val, "score": val[primary],
                           "throughput": mean_across(throughput), "steps": steps,
                           "lr": float(sched.get_last_lr()[0])})
        _check_same_on_every_rank(loss)
        _log_epoch(rank, cfg, ws.history[-1])
        best = save_and_report(model, opt, sched, loss, ws, best, meta, val)


# ---- detectors ------------------------------------------------------------------


def detector_loop(config: dict) -> None:
    from models.detection import build_for_training

    cfg, device, rank, size = _setup(config)
    paths = split_paths(cfg.data, cfg.task)
    train_ds = DetectionDataset(paths["train"], cfg.task, train=True)
    val_ds = DetectionDataset(paths["val"], cfg.task, train=False, vocab=train_ds.vocab)
    vocab = train_ds.vocab
    model, info = build_for_training(cfg.model_arch, init=cfg.init, num_classes=vocab.num_classes,
                                     num_keypoints=len(vocab.keypoint_names),
                                     image_size=cfg.image_size, seed=cfg.seed)
    model.to(device)
    sampler = DistributedSampler(train_ds, num_replicas=size, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                        **_loader_kwargs(cfg, device))
    meta = {"arch": cfg.model_arch, "task": cfg.task, "labels": list(vocab.names),
            "keypoint_names": list(vocab.keypoint_names), "image_size": info.input_size[0],
            "category_ids": list(vocab.category_ids), "init": cfg.init, "trained_on": cfg.data,
            "lakelens_version": version()}

    def forward(ddp: torch.nn.Module, _loss: None, batch: tuple[list, list]) -> tuple[torch.Tensor, int]:
        images = [im.to(device, non_blocking=True) for im in batch[0]]
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch[1]]
        with autocast(device):
            return sum(ddp(images, targets).values()), len(images)

    _fit(cfg, model, loader, sampler, device, rank, meta, forward,
         lambda: evaluate_detector(model, val_ds, cfg, device, rank, size), PRIMARY[cfg.task])


def evaluate_detector(model: torch.nn.Module, ds: DetectionDataset, cfg: TrainConfig,
                      device: torch.device, rank: int, size: int) -> dict[str, float]:
    """COCO AP of the model on `ds`: each rank predicts its shard, rank 0 scores all."""
    from pipelines.coco import coco_eval

    model.eval()
    dts: dict[str, list[dict]] = {t: [] for t in IOU_TYPES[cfg.task]}
    mine = list(range(rank, len(ds), size))
    with torch.inference_mode():
        for start in range(0, len(mine), cfg.batch_size):
            batch = [ds[i] for i in mine[start:start + cfg.batch_size]]
            with autocast(device):
                outputs = model([im.to(device) for im, _ in batch])
            for (_, target), out in zip(batch, outputs, strict=True):
                _to_coco(int(target["image_id"]), {k: (v.float() if v.is_floating_point() else v).cpu()
                                                  for k, v in out.items()},
                         ds, dts)
    model.train()
    gathered = gather(dts)
    metrics: dict[str, float] | None = None
    if rank == 0:
        metrics = {}
        image_ids = list(ds.image_ids)
        for iou_type in dts:
            all_dts = [d for part in gathered for d in part[iou_type]]
            stats = coco_eval(ds.coco, all_dts, iou_type, image_ids)["stats"]
            metrics |= {f"{iou_type}_{k}": stats[k] for k in KEPT_STATS}
    return gather(metrics)[0]


def _to_coco(image_id: int, out: dict[str, torch.Tensor], ds: DetectionDataset,
             dts: dict[str, list[dict]]) -> None:
    boxes = out["boxes"].numpy()
    for j, (box, label, score) in enumerate(zip(boxes, out["labels"].tolist(), out["scores"].tolist(),
                                                strict=True)):
        if label == 0:  # background: RetinaNet and FCOS score it like a class
            continue
        x0, y0, x1, y1 = (float(v) for v in box)
        base = {"image_id": image_id, "category_id": ds.vocab.category_of(label), "score": score}
        dts["bbox"].append(base | {"bbox": [x0, y0, x1 - x0, y1 - y0]})
        if "segm" in dts:
            m = (out["masks"][j, 0] > 0.5).numpy().astype(np.uint8)
            rle = mask_utils.encode(np.asfortranarray(m))
            dts["segm"].append(base | {"segmentation": {"size": rle["size"],
                                                        "counts": rle["counts"].decode()}})
        if "keypoints" in dts:
            kp = out["keypoints"][j].numpy().copy()
            kp[:, 2] = 1.0
            dts["keypoints"].append(base | {"keypoints": kp.reshape(-1).tolist()})


# ---- embedders ------------------------------------------------------------------


def embedder_loop(config: dict) -> None:
    from models.embedding import build_for_training
    from models.metric import PKSampler, build_loss

    cfg, device, rank, size = _setup(config)
    paths = split_paths(cfg.data, cfg.task)
    train_items, unit = embed_items(paths["train"], cfg.unit)
    # proxy and class-weight losses hold a row per training identity: labels 0..C-1
    train_items, num_classes = contiguous_labels(train_items)
    val_items, _ = embed_items(paths["val"], unit)
    if len(val_items) <= max(RECALL_KS):
        raise LakelensError(f"the val split has {len(val_items)} {unit}s; Recall@{max(RECALL_KS)} "
                            f"needs more than {max(RECALL_KS)}")
    model, info, crop = build_for_training(cfg.model_arch, init=cfg.init, dim=cfg.dim, seed=cfg.seed)
    model.to(device)
    loss = build_loss(cfg.loss, num_classes=num_classes, dim=model.dim).to(device)
    train_ds = EmbedDataset(train_items, crop, train=True)
    val_ds = EmbedDataset(val_items, crop, train=False)
    sampler = PKSampler(train_ds.labels, cfg.p, cfg.k, seed=cfg.seed, rank=rank, world_size=size)
    loader = DataLoader(train_ds, batch_sampler=sampler, **_loader_kwargs(cfg, device))
    meta = {"arch": cfg.model_arch, "task": "embed", "dim": model.dim, "unit": unit, "crop": crop,
            "loss": cfg.loss, "init": cfg.init, "trained_on": cfg.data, "lakelens_version": version()}

    def forward(ddp: torch.nn.Module, ddp_loss: torch.nn.Module,
                batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        x, y = batch
        with autocast(device):
            emb = ddp(x.to(device, non_blocking=True))
        # the loss in float32: its exp(50 * s) terms are too sharp for bf16
        return ddp_loss(emb.float(), y.to(device)), len(y)

    _fit(cfg, model, loader, sampler, device, rank, meta, forward,
         lambda: evaluate_embedder(model, val_ds, device, rank, size), PRIMARY["embed"], loss)


def evaluate_embedder(model: torch.nn.Module, ds: EmbedDataset, device: torch.device,
                      rank: int, size: int, batch_size: int = 64) -> dict[str, float]:
    """Recall@1/2/4/8, MAP@R and R-precision on held-out identities (pytorch-metric-
    learning's AccuracyCalculator): each rank embeds its shard, rank 0 scores."""
    from models.metric import retrieval_metrics

    model.eval()
    mine = list(range(rank, len(ds), size))
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    with torch.inference_mode():
        for start in range(0, len(mine), batch_size):
            batch = [ds[i] for i in mine[start:start + batch_size]]
            x = torch.stack([b[0] for b in batch]).to(device)
            with autocast(device):
                emb = model(x)
            parts.append((emb.float().cpu().numpy(), np.asarray([b[1] for b in batch])))
    model.train()
    gathered = gather(parts)
    metrics: dict[str, float] | None = None
    if rank == 0:
        emb = np.concatenate([e for part in gathered for e, _ in part])
        labels = np.concatenate([y for part in gathered for _, y in part])
        metrics = retrieval_metrics(emb, labels, RECALL_KS)
    return gather(metrics)[0]



# ---- semantic segmentation --------------------------------------------------------


def semantic_loop(config: dict) -> None:
    """Per-pixel cross-entropy (IGNORE pixels left out) on square crops; validation scores
    whole held-out images as annotate would see them (mean IoU, pixel accuracy, fwIoU)."""
    from models.semantic import build_for_training, input_sizes

    cfg, device, rank, size = _setup(config)
    paths = split_paths(cfg.data, cfg.task)
    side = input_sizes(cfg.model_arch, cfg.image_size)[0]
    train_ds = SemanticDataset(paths["train"], size=side, train=True)
    val_ds = SemanticDataset(paths["val"], size=side, train=False, vocab=train_ds.vocab)
    vocab = train_ds.vocab
    model, info = build_for_training(cfg.model_arch, init=cfg.init, num_classes=vocab.num_classes,
                                     seed=cfg.seed, image_size=cfg.image_size)
    model.to(device)
    sampler = DistributedSampler(train_ds, num_replicas=size, rank=rank, shuffle=True, seed=cfg.seed)
    # full batches only (as torchvision's segmentation reference trains): DeepLab's ASPP
    # image-pooling branch normalises one value per channel per image, and BatchNorm
    # cannot train on a batch of one
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        **_loader_kwargs(cfg, device))
    if len(loader) == 0:
        raise LakelensError(f"the train split has {len(train_ds)} images: fewer than --batch-size "
                            f"{cfg.batch_size} for each of the {size} workers")
    meta = {"arch": cfg.model_arch, "task": "semantic", "labels": list(vocab.names),
            "category_ids": list(vocab.category_ids), "image_size": side, "init": cfg.init,
            "trained_on": cfg.data, "lakelens_version": version()}
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=train_ds.ignore)

    def forward(ddp: torch.nn.Module, _loss: None,
                batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        x, y = batch
        with autocast(device):
            out = ddp(x.to(device, non_blocking=True))
        y = y.to(device)
        loss = loss_fn(out["out"].float(), y)
        if out.get("aux") is not None:  # FCN/DeepLab's auxiliary head, as torchvision trains them
            loss = loss + 0.5 * loss_fn(out["aux"].float(), y)
        return loss, len(x)

    _fit(cfg, model, loader, sampler, device, rank, meta, forward,
         lambda: evaluate_semantic(model, val_ds, info.input_size, device, rank, size),
         PRIMARY["semantic"])


def evaluate_semantic(model: torch.nn.Module, ds: SemanticDataset, sizes: tuple[int, int],
                      device: torch.device, rank: int, size: int) -> dict[str, float]:
    """Each rank scores its shard of the val images into a confusion matrix; the summed
    matrix gives every rank the same mean IoU, pixel accuracy and frequency-weighted IoU."""
    from models.semantic import evaluate_model, segmentation_metrics

    n = ds.vocab.num_classes
    conf = evaluate_model(model, ds.pairs(list(range(rank, len(ds), size))), n,
                          min_size=sizes[0], max_size=sizes[1], device=device)
    total = sum(gather(conf))
    stats = segmentation_metrics(total, ds.vocab.names)
    return {k: v for k, v in stats.items() if k != "per_class_iou"}


LOOPS: dict[str, Callable[[dict], None]] = {"detector": detector_loop, "embedder": embedder_loop,
                                            "semantic": semantic_loop}
