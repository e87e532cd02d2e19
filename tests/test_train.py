"""Ray Train on tiny synthetic data: two CPU workers (gloo DDP), a few steps each.

The loss goes down, the best model round-trips into annotate (labels included) and into
index queries, a crashed or stopped run resumes from its checkpoint, and mistakes are one
clear line.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from index.store import open_index
from models.detection import build_detector
from models.embedding import build_embedder, build_for_training
from models.errors import LakelensError
from models.metric import build_loss
from pipelines import annotate
from pipelines.config import AnnotateConfig
from pipelines.indexing import IndexBuildConfig, build
from pipelines.synth import CATEGORIES, write_dataset
from pipelines.train import TrainConfig, run
from pipelines.train.datasets import contiguous_labels, embed_items, split_paths
from pipelines.train.loops import _optimizer
from pipelines.train.worker import LR_FLOOR, load_state, lr_schedule, resumed_schedule, warmup_steps
from tests.helpers import read_results
from tests.test_cli import _one_line_error, lakelens

LABELS = ["__background__", *CATEGORIES]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train") / "data"
    write_dataset(root, images=64, seed=3, val_fraction=0.25, width=96, height=96)
    return root


def _detector_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = {"kind": "detector", "task": "detect", "arch": "fasterrcnn_tiny", "init": "random",
            "data": str(data), "out": str(out), "workers": 2, "epochs": 3,
            "max_steps_per_epoch": 4, "batch_size": 2, "image_size": 96, "loader_workers": 1}
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def detector_run(ray_local, data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("det") / "run"
    return out, run(_detector_cfg(data, out))


def test_detector_loss_goes_down_and_metrics_are_reported(detector_run) -> None:
    out, summary = detector_run
    report = json.loads((out / "metrics.json").read_text())
    losses = [h["loss"] for h in report["history"]]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    for h in report["history"]:
        assert set(h["val"]) == {"bbox_AP", "bbox_AP50", "bbox_AP75"}
        assert all(0.0 <= v <= 1.0 for v in h["val"].values())
    assert summary.best == max(report["history"], key=lambda h: h["score"])["val"]
    assert summary.epochs_run == 3 and summary.resumed_from_epoch == 0


def test_detector_checkpoint_round_trips_into_annotate(detector_run, data: Path, tmp_path: Path) -> None:
    out, summary = detector_run
    model, info = build_detector("fasterrcnn_tiny", weights=summary.model)
    assert info.labels == tuple(LABELS) and info.input_size[0] == 96
    ckpt = torch.load(summary.model, weights_only=True)
    assert ckpt["lakelens"]["task"] == "detect" and ckpt["lakelens"]["category_ids"] == [1, 2, 3]
    # the best epoch's weights, not the last one's
    assert ckpt["lakelens"]["epoch"] == summary.best_epoch
    # annotate takes the arch and the image size from the checkpoint
    result = annotate.run(AnnotateConfig(
        sources=(str(data / "val" / "images"),), out=str(tmp_path / "ann"), tasks=("detect",),
        weights={"detect": summary.model}, score_threshold=0.0, batch_size=4))
    assert (result.annotated, result.errors) == (16, 0)
    table = read_results(tmp_path / "ann")
    assert table.column("models").to_pylist()[0][0]["arch"] == "fasterrcnn_tiny"
    names = {d["label_name"] for row in table.column("detections").to_pylist() for d in row}
    assert names and names <= set(CATEGORIES)


@pytest.mark.slow  # a second Ray Train run: ~26 s; `make test-all` runs it
def test_resume_continues_from_the_checkpoint(detector_run, data: Path) -> None:
    out, first = detector_run
    before = json.loads((out / "metrics.json").read_text())["history"]
    with pytest.raises(LakelensError, match="--resume"):
        run(_detector_cfg(data, out, epochs=4))
    with pytest.raises(LakelensError, match="arch"):
        run(_detector_cfg(data, out, epochs=4, arch="maskrcnn_tiny", task="segment", resume=True))
    summary = run(_detector_cfg(data, out, epochs=4, resume=True))
    after = json.loads((out / "metrics.json").read_text())["history"]
    assert summary.resumed_from_epoch == 3 and summary.epochs_run == 4
    assert after[:3] == before  # epochs 1-3 were not run again
    assert after[3]["epoch"] == 4
    latest = sorted(p for p in (out / "ray").glob("checkpoint_*") if p.is_dir())[-1]
    sched = torch.load(latest / "state.pt", weights_only=True)["scheduler"]
    assert sched["last_epoch"] == 4 * 4  # the LR schedule continued too


@pytest.mark.slow  # ~38 s; the detector training tests stay in the default run
def test_embedder_trains_and_serves_index_queries(ray_local, data: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(kind="embedder", task="embed", arch="tiny", init="random", data=str(data),
                      out=str(tmp_path / "emb"), workers=2, epochs=4, p=2, k=4, dim=16,
                      loss="contrastive", loader_workers=1)
    summary = run(cfg)
    history = json.loads((tmp_path / "emb" / "metrics.json").read_text())["history"]
    assert len(history) == 4 and history[-1]["loss"] < history[0]["loss"], history
    assert set(summary.best) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"}
    assert 0 <= summary.best["map@r"] <= summary.best["r_precision"] + 1e-9 <= 1 + 1e-9
    assert all(0.0 <= v <= 1.0 for v in summary.best.values())
    model, info, crop = build_embedder("tiny", weights=summary.model)
    assert info.embedding_dim == 16 and model.dim == 16
    # annotate -> index -> query with the trained embedder: every image finds itself
    val_images = data / "val" / "images"
    result = annotate.run(AnnotateConfig(
        sources=(str(val_images),), out=str(tmp_path / "ann"), tasks=("embed",),
        weights={"embed": summary.model}, batch_size=8))
    assert result.annotated == 16
    build(IndexBuildConfig(results=str(tmp_path / "ann"), out=str(tmp_path / "index")))
    index = open_index(tmp_path / "index")
    assert index.dim == 16
    paths = sorted(str(p) for p in val_images.glob("*.jpg"))[:4]
    found = index.search_images(paths, k=2)
    assert [u[0] for u in found.uris] == paths


def test_training_mistakes_are_one_line(ray_local, data: Path, tmp_path: Path) -> None:
    _one_line_error(lakelens("train", "detector", "--task", "detect", "--data", str(tmp_path),
                             "--out", str(tmp_path / "r"), "--init", "random"),
                    "train/annotations.json")
    _one_line_error(lakelens("train", "embedder", "--data", str(data), "--out", str(tmp_path / "r"),
                             "--init", str(tmp_path / "missing.pt")), "is not a file")
    with pytest.raises(LakelensError, match="unknown detect arch 'maskrcnn_tiny'"):
        _detector_cfg(data, tmp_path / "r", arch="maskrcnn_tiny")
    with pytest.raises(LakelensError, match="no published weights"):
        run(_detector_cfg(data, tmp_path / "r", init="default"))
    with pytest.raises(LakelensError, match="--workers 9 x --cpus-per-worker 1 needs 9 CPUs"):
        run(_detector_cfg(data, tmp_path / "r", workers=9))


@pytest.mark.gpu
def test_detector_and_embedder_train_on_a_gpu(ray_local, data: Path, tmp_path: Path) -> None:
    det = run(_detector_cfg(data, tmp_path / "det", workers=1, gpu=True, epochs=2))
    assert det.epochs_run == 2
    model, info = build_detector("fasterrcnn_tiny", weights=det.model)  # loads on CPU
    assert info.labels == tuple(LABELS)
    emb = run(TrainConfig(kind="embedder", task="embed", arch="tiny", init="random", data=str(data),
                          out=str(tmp_path / "emb"), workers=1, gpu=True, epochs=2, p=2, k=4))
    assert emb.epochs_run == 2


def _embedder_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = {"kind": "embedder", "task": "embed", "arch": "tiny", "init": "random", "data": str(data),
            "out": str(out), "workers": 2, "epochs": 4, "p": 2, "k": 2, "dim": 16,
            "loss": "proxy_anchor", "loader_workers": 1}
    return TrainConfig(**(base | kw))


def _checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "ray").glob("checkpoint_*") if (p / "state.pt").exists())


def _assert_model_file_holds_the_model_alone(path: Path, loss_shape: tuple[int, ...]) -> None:
    """The embedder checkpoint annotate loads: the model's tensors, no proxies."""
    state_dict = torch.load(path, weights_only=True)["state_dict"]
    fresh, _, _ = build_for_training("tiny", init="random", dim=16, seed=0)
    assert set(state_dict) == set(fresh.state_dict())
    assert not any(tuple(v.shape) == loss_shape for v in state_dict.values())
    model, info, _ = build_embedder("tiny", weights=str(path))
    assert info.embedding_dim == 16


def _cosine_tail(t: int, resumed_at: int, lr_then: float, total: int, warmup: int, floor: float) -> float:
    """CosineAnnealingLR stepped recursively from lr_then at step resumed_at to floor at total."""
    def c(step: int) -> float:
        return 1 + math.cos(math.pi * (step - warmup) / (total - warmup))
    return floor + (lr_then - floor) * c(t) / c(resumed_at)


def test_lr_schedule_resumed_with_more_steps_falls_from_where_it_was() -> None:
    """No Ray: warm-up then cosine as planned; a resume after 12 of 30 steps that now ends
    after 50 goes on from the same LR to the floor at step 50, the warm-up not repeated."""
    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.01},
                                  {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0}])

    opt = optimizer()
    sched = lr_schedule(opt, 30, floor=0.0005)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    warmup = warmup_steps(30)
    assert warmup == 3 and lrs[:4] == pytest.approx([0.001, 0.004, 0.007, 0.01])
    assert lrs[4:] == pytest.approx([0.0005 + 0.0095 * (1 + math.cos(math.pi * (t - 3) / 27)) / 2
                                     for t in range(4, 12)])
    lr_then = sched.get_last_lr()[0]
    opt2 = optimizer()
    resumed = lr_schedule(opt2, 50, floor=0.0005)  # its own warm-up would be 5 steps
    opt2.load_state_dict(opt.state_dict())
    resumed.load_state_dict(resumed_schedule(sched.state_dict(), 50))
    after = []
    for _ in range(12, 50):
        opt2.step()
        resumed.step()
        after.append(resumed.get_last_lr()[0])
    assert after == pytest.approx([_cosine_tail(t, 12, lr_then, 50, warmup, 0.0005) for t in range(13, 51)])
    assert max(after) < lr_then and after[-1] == pytest.approx(0.0005)
    # unchanged total: exactly the planned curve
    assert resumed_schedule(sched.state_dict(), 30)["_schedulers"][1]["T_max"] == 27


@pytest.mark.slow  # two Ray Train runs, 6 epochs in all: ~30-50 s on 2 cores
def test_proxy_anchor_crashed_run_resumes_with_its_proxies_and_lr_schedule(
        ray_local, data: Path, tmp_path: Path) -> None:
    """A 4-epoch proxy_anchor run crashes in epoch 3 (its val images become unreadable),
    then resumes with --epochs 6: the proxies come back from state.pt (model.pt never
    holds them), and the LR goes on falling from where it was to the floor at the new
    end: no warm-up again, no jump back up."""
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    val_images = sorted((copy / "val" / "images").glob("*.jpg"))
    saved = {p: p.read_bytes() for p in val_images}
    out = tmp_path / "run"
    done = threading.Event()

    def crash_after_two_epochs() -> None:
        while not done.is_set():
            if len(_checkpoints(out)) >= 2:
                for p in val_images:
                    p.write_bytes(b"not an image")
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=crash_after_two_epochs, daemon=True)
    watcher.start()
    try:
        with pytest.raises(LakelensError, match="cannot read training image"):
            run(_embedder_cfg(copy, out, epochs=4))
    finally:
        done.set()
        watcher.join()
    for p, data_bytes in saved.items():
        p.write_bytes(data_bytes)

    crashed = _checkpoints(out)[-1]
    state = torch.load(crashed / "state.pt", weights_only=True)
    assert state["epoch"] == 2
    items, num_classes = contiguous_labels(embed_items(split_paths(str(copy), "embed")["train"])[0])
    proxies = state["loss"]["loss.proxies"]
    assert proxies.shape == (num_classes, 16) == (12, 16)
    groups = state["optimizer"]["param_groups"]  # the proxies' own group, at 100x the LR
    assert groups[1]["initial_lr"] == pytest.approx(100 * groups[0]["initial_lr"])
    _assert_model_file_holds_the_model_alone(crashed / "model.pt", tuple(proxies.shape))
    _assert_model_file_holds_the_model_alone(crashed / "best.pt", tuple(proxies.shape))

    # what --resume loads: a fresh loss (other random proxies) gets the saved ones back
    cfg = _embedder_cfg(copy, out, epochs=6, resume=True)
    steps = state["history"][0]["steps"]
    model, _, _ = build_for_training("tiny", init="random", dim=16, seed=0)
    torch.manual_seed(1)
    loss = build_loss("proxy_anchor", num_classes=num_classes, dim=16)
    assert not torch.equal(loss.loss.proxies.detach(), proxies)
    opt, sched = _optimizer(model, loss, cfg, steps)
    ws, _ = load_state(crashed, model, opt, sched, loss, steps_per_epoch=steps, epochs=cfg.epochs)
    assert ws.epoch == 2
    assert torch.equal(loss.loss.proxies.detach(), proxies)

    summary = run(cfg)
    assert summary.resumed_from_epoch == 2 and summary.epochs_run == 6
    _assert_model_file_holds_the_model_alone(out / "model.pt", tuple(proxies.shape))
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history[:2] == state["history"]
    assert all(h["steps"] == steps for h in history)
    lr, floor = cfg.learning_rate, LR_FLOOR * cfg.learning_rate
    total, warmup = 4 * steps, warmup_steps(4 * steps)  # the crashed run's plan
    assert warmup >= 1
    planned = [floor + (lr - floor) * (1 + math.cos(math.pi * (e * steps - warmup) / (total - warmup))) / 2
               for e in (1, 2)]
    lrs = [h["lr"] for h in history]
    assert lrs[:2] == pytest.approx(planned, rel=1e-6)
    new_total = 6 * steps
    expected = [_cosine_tail(e * steps, 2 * steps, lrs[1], new_total, warmup, floor) for e in (3, 4, 5, 6)]
    assert lrs[2:] == pytest.approx(expected, rel=1e-6)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))  # falling, never back up
    assert lrs[-1] == pytest.approx(floor, rel=1e-6)
    latest = torch.load(_checkpoints(out)[-1] / "state.pt", weights_only=True)
    assert latest["scheduler"]["_milestones"] == [warmup]  # the warm-up was not resized
    assert latest["scheduler"]["last_epoch"] == new_total


@pytest.mark.slow  # the default run trains the default loss through Ray Train; unit tests cover arcface
def test_arcface_trains_and_keeps_its_class_weights_out_of_model_pt(
        ray_local, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "arc"
    summary = run(_embedder_cfg(data, out, loss="arcface", epochs=1))
    assert summary.epochs_run == 1
    state = torch.load(_checkpoints(out)[-1] / "state.pt", weights_only=True)
    weights = state["loss"]["loss.W"]
    assert weights.shape == (16, 12)
    assert state["optimizer"]["param_groups"][1]["params"]  # their own LR group
    _assert_model_file_holds_the_model_alone(out / "model.pt", tuple(weights.shape))
