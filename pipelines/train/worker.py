"""What every training loop does inside a Ray Train worker: the LR schedule (and its
continuation on resume), the rank and world size, gathering across ranks, and the
checkpoint a rank writes and restores ({model.pt, best.pt, state.pt})."""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import weights as W
from pipelines.train.config import MODEL_FILE

logger = logging.getLogger(__name__)

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
