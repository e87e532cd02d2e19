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
import os
import shutil
import time
from pathlib import Path

import torch

from models import weights as W
from models.errors import LakelensError
from models.registry import ensure_default_weights
from pipelines.train.config import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    RAY_DIR,
    RESUME_KEYS,
    TrainConfig,
    TrainSummary,
)
from pipelines.train.datasets import split_paths
from pipelines.train.loops import LOOPS

logger = logging.getLogger(__name__)


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

    from pipelines.annotate.connect import connect
    from pipelines.cluster.weights import joined_cluster, ship_published

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
