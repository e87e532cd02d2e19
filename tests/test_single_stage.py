"""The single-stage detectors the seeds name beside Faster R-CNN: SSD, SSDlite, RetinaNet,
FCOS. Built with `random` weights (no downloads here), run on small images, trained a
step with resized heads, and round-tripped as checkpoints into annotate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.detection import COCO_LABELS, build_detector, build_for_training
from models.predict import DetectionPredictor
from models.weights import save_checkpoint

ARCHS = ["ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "retinanet_resnet50_fpn_v2",
         "fcos_resnet50_fpn"]
SIZE = 128  # RetinaNet / FCOS shorter side here; SSDs always see their fixed square


def _images(n: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_builds_and_predicts_in_the_images_pixels(arch: str) -> None:
    p = DetectionPredictor(arch, weights="random", image_size=SIZE, score_threshold=0.0, max_batch=2)
    assert p.info.labels == COCO_LABELS and p.info.task == "detect"
    fixed = {"ssd300_vgg16": (300, 300), "ssdlite320_mobilenet_v3_large": (320, 320)}
    assert p.info.input_size == fixed.get(arch, (SIZE, round(SIZE * 1333 / 800)))
    for out in p(_images()):
        boxes, labels, scores = out["boxes"], out["labels"], out["scores"]
        assert len(boxes) == len(labels) == len(scores) > 0
        assert (boxes[:, 0] >= -1e-3).all() and (boxes[:, 2] <= 64 + 1e-3).all()
        assert (boxes[:, 1] >= -1e-3).all() and (boxes[:, 3] <= 48 + 1e-3).all()
        assert (labels >= 0).all() and (labels < len(COCO_LABELS)).all()
        assert (np.diff(scores) <= 1e-6).all()  # ranked


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "ssd300_vgg16" else a
                                  for a in ARCHS])
def test_checkpoints_resize_heads_and_train(arch: str, tmp_path: Path) -> None:
    """A 91-class checkpoint fine-tunes to 3 classes (new classification head, the rest
    kept); a plain state dict with no labels still loads with its class count."""
    model, _ = build_detector(arch, weights="random", image_size=SIZE)
    ckpt = tmp_path / "coco.pt"
    save_checkpoint(ckpt, model.state_dict(), {"arch": arch, "task": "detect", "labels": list(COCO_LABELS)})
    tuned, _ = build_for_training(arch, init=str(ckpt), num_classes=3, image_size=SIZE)
    kept = [k for k, v in tuned.state_dict().items() if "classification_head" not in k
            and v.dtype.is_floating_point]
    assert kept and all(torch.equal(tuned.state_dict()[k], model.state_dict()[k]) for k in kept[:20])
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=1e-3)
    images = [torch.rand(3, 48, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([2])}] * 2
    losses = tuned(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    plain = tmp_path / "plain.pt"
    torch.save(tuned.state_dict(), plain)
    loaded, info = build_detector(arch, weights=str(plain), image_size=SIZE, score_threshold=0.0)
    assert len(info.labels) == 3
    with torch.inference_mode():
        out = loaded([torch.rand(3, 48, 64)])[0]
    assert len(out["labels"]) and int(out["labels"].max()) < 3


@pytest.mark.parametrize("arch", ["ssdlite320_mobilenet_v3_large",
                                  pytest.param("retinanet_resnet50_fpn_v2", marks=pytest.mark.slow)])
def test_checkpoint_round_trips_into_annotate(ray_local, arch: str, tmp_path: Path) -> None:
    from pipelines.annotate import run
    from pipelines.config import AnnotateConfig
    from tests.helpers import read_results

    labels = ["__background__", "square", "disc"]
    model, _ = build_for_training(arch, init="random", num_classes=len(labels), image_size=SIZE)
    ckpt = tmp_path / "shapes.pt"
    save_checkpoint(ckpt, model.state_dict(), {"arch": arch, "task": "detect", "labels": labels,
                                               "image_size": SIZE})
    (tmp_path / "lake").mkdir()
    for n, pixels in enumerate(_images(3)):
        Image.fromarray(pixels).save(tmp_path / "lake" / f"{n}.jpg")
    summary = run(AnnotateConfig(sources=(str(tmp_path / "lake"),), out=str(tmp_path / "out"),
                                 tasks=("detect",), archs={"detect": arch},
                                 weights={"detect": str(ckpt)}, score_threshold=0.0, batch_size=2))
    assert (summary.annotated, summary.errors) == (3, 0)
    rows = read_results(tmp_path / "out").to_pylist()
    dets = [d for r in rows for d in r["detections"]]
    assert dets and {d["label_name"] for d in dets} <= set(labels[1:])
    assert all(0 <= d["box"][0] <= d["box"][2] <= 64 + 1e-3 for d in dets)
    assert all(m["arch"] == arch for r in rows for m in r["models"])
