"""Ray Train on tiny synthetic data: two CPU workers (gloo DDP), a few steps each.

The loss goes down, the best model round-trips into annotate (labels included) and into
index queries, a crashed or stopped run resumes from its checkpoint, and mistakes are one
clear line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from index.store import open_index
from models.detection import build_detector
from models.embedding import build_embedder
from models.errors import LakelensError
from pipelines import annotate
from pipelines.config import AnnotateConfig
from pipelines.indexing import IndexBuildConfig, build
from pipelines.synth import CATEGORIES, write_dataset
from pipelines.train import TrainConfig, run
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
