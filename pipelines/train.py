"""`lakelens train detector|embedder|semantic`: Ray Train (TorchTrainer, DDP) on a COCO dataset.

The driver checks the config and the data, starts one training worker per `--workers`
(gloo on CPU, nccl on GPU), and when training ends copies the best model out of Ray
Train's checkpoints:

    RUN_DIR/model.pt       the best epoch's weights + metadata; `annotate --weights TASK=PATH`
    RUN_DIR/metrics.json   config, per-epoch loss and validation metrics, the best epoch
    RUN_DIR/ray/           Ray Train's run: checkpoints (latest and best kept), state

Each checkpoint holds the model, the optimiser, the LR schedule, the loss's own parameters
(proxies) and the history, so a run that crashed continues from its last epoch with
`--resume`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import weights as W
from models.errors import LakelensError
from models.registry import DEFAULT_ARCHS, check_arch, ensure_default_weights

logger = logging.getLogger(__name__)

KINDS = ("detector", "embedder", "semantic")
RAY_DIR = "ray"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "train_config.json"
# what a resumed run must share with the run it continues
RESUME_KEYS = ("kind", "task", "arch", "init", "data", "image_size", "dim", "unit", "loss")


@dataclass(frozen=True)
class TrainConfig:
    """`lakelens train`. Detector batches are `batch_size` images per worker; embedder
    batches are P identities x K examples per worker."""

    kind: str
    data: str
    out: str
    task: str = "detect"  # detector: detect, segment or pose; embedder: embed
    arch: str | None = None  # None: the task's default
    init: str = W.DEFAULT
    workers: int = 2
    gpu: bool = False
    cpus_per_worker: float = 1.0
    epochs: int = 10
    batch_size: int = 4
    lr: float | None = None  # None: 3e-3 from random init, 1e-4 when fine-tuning
    weight_decay: float = 1e-4
    image_size: int | None = None  # detector's shorter side; None: the arch's
    max_steps_per_epoch: int | None = None
    loader_workers: int | None = None  # DataLoader processes per worker; None: from its CPUs
    loss: str = "multi_similarity"
    p: int = 8
    k: int = 4
    dim: int | None = 128  # embedder projection; None: the trunk's own features
    unit: str = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    max_failures: int = 0
    address: str | None = None
    num_cpus: int | None = None  # local Ray only

    def __post_init__(self) -> None:
        from models.registry import LOSSES
        from pipelines.datasets import DETECTION_TASKS, UNITS

        if self.kind not in KINDS:
            raise LakelensError(f"unknown training kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.kind == "detector" and self.task not in DETECTION_TASKS:
            raise LakelensError(f"--task {self.task!r}: choose from {', '.join(DETECTION_TASKS)}")
        if self.kind == "embedder" and self.task != "embed":
            raise LakelensError(f"an embedder's task is 'embed', not {self.task!r}")
        if self.kind == "semantic" and self.task != "semantic":
            raise LakelensError(f"a semantic model's task is 'semantic', not {self.task!r}")
        if self.kind == "semantic" and self.batch_size < 2 and "deeplabv3" in self.model_arch:
            raise LakelensError(f"{self.model_arch} trains on --batch-size 2 or more (BatchNorm in "
                                "its ASPP image-pooling branch sees one value per image)")
        check_arch(self.task, self.model_arch)
        W.validate_spec(self.init, what="--init")
        for name in ("workers", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise LakelensError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise LakelensError(f"--max-steps-per-epoch must be >= 1, got {self.max_steps_per_epoch}")
        if self.cpus_per_worker <= 0:
            raise LakelensError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise LakelensError(f"--lr must be in (0, 1), got {self.lr}")
        if self.image_size is not None and not 16 <= self.image_size <= 4096:
            raise LakelensError(f"--image-size must be in 16..4096, got {self.image_size}")
        if self.loss not in LOSSES:
            raise LakelensError(f"unknown --loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.unit not in UNITS:
            raise LakelensError(f"unknown --unit {self.unit!r}; choose from {', '.join(UNITS)}")
        if self.dim is not None and self.dim < 2:
            raise LakelensError(f"--dim must be >= 2, got {self.dim}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise LakelensError(f"--loader-workers must be >= 0, got {self.loader_workers}")
        if self.resume and self.overwrite:
            raise LakelensError("--resume continues a run and --overwrite discards it; pass one")

    @property
    def model_arch(self) -> str:
        return self.arch or DEFAULT_ARCHS[self.task]

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-3 if self.init == W.RANDOM else 1e-4)


@dataclass(frozen=True)
class TrainSummary:
    out: str
    model: str
    best_epoch: int
    best: dict[str, float]
    epochs_run: int
    resumed_from_epoch: int
    wall_s: float

    def describe(self) -> str:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in self.best.items())
        resumed = f" (resumed after epoch {self.resumed_from_epoch})" if self.resumed_from_epoch else ""
        return (f"Trained {self.epochs_run} epochs{resumed} in {self.wall_s:.0f} s; best epoch "
                f"{self.best_epoch}: {scores}. Weights: {self.model} "
                f"(annotate --weights TASK={self.model}); history in "
                f"{os.path.join(self.out, METRICS_FILE)}.")


def _prepare_run_dir(cfg: TrainConfig) -> None:
    out = Path(cfg.out)
    previous = out / CONFIG_FILE
    if previous.exists() and cfg.overwrite:
        for name in (RAY_DIR, MODEL_FILE, METRICS_FILE, CONFIG_FILE):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif previous.exists() and not cfg.resume:
        raise LakelensError(f"--out {cfg.out} holds a training run; pass --resume to continue it "
                            "or --overwrite to start over")
    elif previous.exists():
        old = json.loads(previous.read_text())
        new = dataclasses.asdict(cfg)
        changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in RESUME_KEYS if old.get(k) != new[k]]
        if changed:
            raise LakelensError(f"--resume: this run differs from the one in {cfg.out} "
                                f"({'; '.join(changed)}); use another --out")
    elif cfg.resume:
        logger.info("--resume: nothing to resume in %s; starting a new run", cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    except OSError as e:
        raise LakelensError(f"--out {cfg.out} is not writable: {e}") from e


def _check_init(cfg: TrainConfig) -> str | None:
    """Fail in the driver, with one line, when the initial weights cannot be had; the URL
    of `default` weights (the driver's cache has them now)."""
    if cfg.init == W.DEFAULT:
        return ensure_default_weights(cfg.task, cfg.model_arch, flag="--init ")
    if W.is_path_spec(cfg.init):
        W.read_for(cfg.init, task=cfg.task, arch=cfg.model_arch)
    return None


def _check_resources(cfg: TrainConfig) -> None:
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if cfg.gpu and gpus < cfg.workers:
        raise LakelensError(f"--gpu with --workers {cfg.workers} needs {cfg.workers} GPUs; the "
                            f"cluster has {gpus:g}" + ("" if gpus else " (drop --gpu to train on CPU)"))
    if cpus < cfg.workers * cfg.cpus_per_worker:
        raise LakelensError(f"--workers {cfg.workers} x --cpus-per-worker {cfg.cpus_per_worker:g} "
                            f"needs {cfg.workers * cfg.cpus_per_worker:g} CPUs; the cluster has {cpus:g}")


def run(cfg: TrainConfig) -> TrainSummary:
    """Train with Ray Train; returns where the best model went and its scores."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.annotate import connect
    from pipelines.cluster.weights import joined_cluster, ship_published
    from pipelines.datasets import split_paths
    from pipelines.train_loops import LOOPS

    started = time.perf_counter()
    split_paths(cfg.data, cfg.task)
    url = _check_init(cfg)
    _prepare_run_dir(cfg)
    connect(cfg)
    _check_resources(cfg)
    out = Path(cfg.out).absolute()
    config = dataclasses.asdict(cfg) | {"data": str(Path(cfg.data).absolute()), "out": str(out)}
    # workers on other nodes get `default` weights from the driver, not from the internet
    shipped = ship_published({url} if url else set(), joined=joined_cluster(cfg.address))
    if shipped:
        config["weights_files"] = shipped
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.gpu else {})
    trainer = TorchTrainer(
        LOOPS[cfg.kind],
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RAY_DIR, storage_path=str(out),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # Train's per-report INFO lines drown the epoch lines; pycocotools' prints are
            # silenced by redirect_stdout, which Train's print patch would bypass
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
    )
    logger.info("training %s %s on %s with %d worker(s) (%s), %d epochs -> %s", cfg.task,
                cfg.model_arch, cfg.data, cfg.workers, "GPU" if cfg.gpu else "CPU", cfg.epochs, out)
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's error; show its last line
        raise LakelensError(f"training failed: {_root_message(e)}") from e
    if result.checkpoint is None:
        raise LakelensError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)
        shutil.copyfile(Path(ckpt_dir) / "best.pt", out / (MODEL_FILE + ".tmp"))
    os.replace(out / (MODEL_FILE + ".tmp"), out / MODEL_FILE)
    history = state["history"]
    best = max(history, key=lambda h: h["score"])
    report = {"config": config, "history": history, "best_epoch": best["epoch"],
              "best": best["val"], "model": str(out / MODEL_FILE)}
    (out / METRICS_FILE).write_text(json.dumps(report, indent=2))
    return TrainSummary(out=str(out), model=str(out / MODEL_FILE), best_epoch=best["epoch"],
                        best=best["val"], epochs_run=len(history),
                        resumed_from_epoch=int(state.get("resumed_from_epoch", 0)),
                        wall_s=time.perf_counter() - started)


def _root_message(e: BaseException) -> str:
    """The innermost cause's message (a LakelensError from a worker stays one line)."""
    seen = e
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    lakelens = [line for line in str(e).splitlines() if "LakelensError:" in line]
    if lakelens:
        return lakelens[-1].split("LakelensError:", 1)[1].strip()
    return text[-1] if text else type(seen).__name__


# ---- inside a training worker ------------------------------------------------------


WARMUP_START = 0.1  # the warm-up's first LR, as a fraction of each group's LR
LR_FLOOR = 0.05  # the cosine's last LR, as a fraction of --lr


def warmup_steps(total_steps: int) -> int:
    return min(100, total_steps // 10)


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                floor: float) -> torch.optim.lr_scheduler.SequentialLR:
    """Linear warm-up from 10 % of each group's LR over min(100, total_steps // 10) steps,
    then cosine down to `floor` at `total_steps`; stepped once per optimiser step.

    `floor` is an absolute LR, shared by every group (CosineAnnealingLR has one eta_min):
    5 % of the model's LR, so a loss's own group at 100x ends at 0.05 % of its peak.
    """
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    warmup = warmup_steps(total_steps)
    return SequentialLR(optimizer, [
        LinearLR(optimizer, start_factor=WARMUP_START, total_iters=warmup),
        CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=floor),
    ], milestones=[warmup])


def resumed_schedule(saved: dict, total_steps: int) -> dict:
    """The saved `lr_schedule` state, continued to a run that now ends after `total_steps`
    optimiser steps (a resume with another --epochs, or another number of steps an epoch).

    The step count and the warm-up carry on as saved: the warm-up is neither repeated nor
    resized. The cosine's end moves to `total_steps`; CosineAnnealingLR steps recursively
    from the current LR, so from the resume point the LR falls from where it was to the
    floor at the new last step (continuous, never back up towards the peak). Unchanged
    when `total_steps` is the saved total, or not beyond the steps already done.
    """
    warmup = int(saved["_milestones"][0])
    done = int(saved["last_epoch"])
    if total_steps <= done:
        return saved
    cosine = dict(saved["_schedulers"][1]) | {"T_max": max(1, total_steps - warmup)}
    return dict(saved) | {"_schedulers": [saved["_schedulers"][0], cosine]}


def world() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just [obj] without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across(value: float) -> float:
    values = gather(value)
    return float(sum(values) / len(values))


@dataclass
class WorkerState:
    """What a checkpoint carries besides the weights."""

    epoch: int = 0  # epochs done
    history: list[dict] = dataclasses.field(default_factory=list)
    best_score: float = -math.inf
    resumed_from_epoch: int = 0


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, loss: torch.nn.Module | None, *,
            steps_per_epoch: int, epochs: int) -> tuple[WorkerState, dict | None]:
    """Load Ray Train's latest checkpoint, if any (see `load_state`).
    Returns the state and the best weights so far (None when starting fresh)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return WorkerState(), None
    with ckpt.as_directory() as d:
        ws, best = load_state(Path(d), model, optimizer, scheduler, loss,
                              steps_per_epoch=steps_per_epoch, epochs=epochs)
    logger.info("resumed after epoch %d (best score so far %.4f)", ws.epoch, ws.best_score)
    return ws, best


def load_state(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, loss: torch.nn.Module | None, *,
               steps_per_epoch: int, epochs: int) -> tuple[WorkerState, dict]:
    """Load a checkpoint directory ({model.pt, best.pt, state.pt}) into the model, the
    optimiser, the LR schedule and the loss (its proxies or class weights, if it has any).
    The schedule is continued to this run's end (`resumed_schedule`): the steps done plus
    `steps_per_epoch` for each of the `epochs` not done yet."""
    current = W.read_checkpoint(str(ckpt_dir / MODEL_FILE))
    best = W.read_checkpoint(str(ckpt_dir / "best.pt"))
    state = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(current.state_dict)
    if loss is not None:
        loss.load_state_dict(state.get("loss", {}))
    optimizer.load_state_dict(state["optimizer"])
    done_steps = int(state["scheduler"]["last_epoch"])
    total = done_steps + steps_per_epoch * max(0, epochs - state["epoch"])
    scheduler.load_state_dict(resumed_schedule(state["scheduler"], total))
    ws = WorkerState(epoch=state["epoch"], history=list(state["history"]),
                     best_score=state["best_score"], resumed_from_epoch=state["epoch"])
    return ws, {"state_dict": best.state_dict, "meta": best.meta}


def save_and_report(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loss: torch.nn.Module | None,
                    ws: WorkerState, best: dict | None, meta: dict,
                    metrics: dict[str, float]) -> dict | None:
    """Rank 0 writes {model.pt, best.pt, state.pt} as a Ray Train checkpoint; every rank
    reports the epoch's metrics. Returns the (possibly new) best weights.

    model.pt and best.pt hold the model alone (what annotate loads); the loss's own
    parameters (proxies) go to state.pt, with the optimiser and the LR schedule."""
    import ray.train

    rank, _ = world()
    entry = ws.history[-1]
    if entry["score"] > ws.best_score or best is None:
        ws.best_score = entry["score"]
        best = {"state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "meta": meta | {"epoch": entry["epoch"], "metrics": entry["val"]}}
    flat = {"epoch": entry["epoch"], "loss": entry["loss"], "score": entry["score"],
            "lr": entry["lr"]} | {f"val_{k}": v for k, v in metrics.items()}
    if rank != 0:
        ray.train.report(flat)
        return best
    with tempfile.TemporaryDirectory() as d:
        W.save_checkpoint(Path(d) / MODEL_FILE, model.state_dict(),
                          meta | {"epoch": entry["epoch"], "metrics": entry["val"]})
        W.save_checkpoint(Path(d) / "best.pt", best["state_dict"], best["meta"])
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "loss": {} if loss is None else {k: v.detach().cpu()
                                                     for k, v in loss.state_dict().items()},
                    "epoch": ws.epoch, "history": ws.history, "best_score": ws.best_score,
                    "resumed_from_epoch": ws.resumed_from_epoch}, Path(d) / "state.pt")
        ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(d))
    return best
