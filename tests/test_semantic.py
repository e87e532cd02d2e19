"""Semantic segmentation, the fifth task: torchvision's FCN / DeepLabV3 / LR-ASPP and the
small U-Net build and run with `random` weights; the metrics the field reports (mean IoU,
pixel accuracy, frequency-weighted IoU) on hand-made cases; class maps to per-class RLE
and back, pixel for pixel; a U-Net trained here on synthetic shapes; a checkpoint through
annotate into the table and `eval` scoring it exactly as the model scores itself; a
version 2 table (no semantic column) read and upgraded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from models.errors import LakelensError
from models.masks import rle_to_mask
from models.semantic import (
    SEMANTIC_ARCHS,
    VOC_LABELS,
    SemanticPredictor,
    UNet,
    build_for_training,
    build_semantic,
    confusion,
    evaluate_model,
    resize_nearest,
    segmentation_metrics,
)
from models.weights import save_checkpoint
from pipelines.annotate.encode import encode_semantic
from pipelines.synth import CATEGORIES, write_dataset
from pipelines.train.datasets import SemanticDataset
from tests.test_cli import lakelens

LABELS = ("__background__", *CATEGORIES)


@pytest.mark.parametrize("arch", sorted(SEMANTIC_ARCHS))
def test_every_arch_builds_and_labels_every_pixel(arch: str) -> None:
    p = SemanticPredictor(arch, weights="random", image_size=64, max_batch=2)
    assert p.info.task == "semantic" and p.info.labels == VOC_LABELS
    assert p.info.input_size == (64, 128)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8),
              rng.integers(0, 256, (90, 30, 3), dtype=np.uint8)]
    out = p(images)
    # the head's grid over each image as the model saw it (shorter side 64, longer <= 128):
    # the same cell size on both sides, at most the input's size and stride 32
    for o, (h, w) in zip(out, [(64, 107), (128, 43)], strict=True):
        gh, gw = o["classes"].shape
        assert o["scores"].shape == (gh, gw)
        assert h / 32 <= gh <= h and w / 32 <= gw <= w
        assert abs(h / gh - w / gw) <= max(h / gh, w / gw) / min(gh, gw) + 1e-9, (arch, h, w, gh, gw)
    for o in out:
        assert o["classes"].max() < len(VOC_LABELS)
        assert ((o["scores"] >= 1 / len(VOC_LABELS) - 1e-3) & (o["scores"] <= 1)).all()
    rows = encode_semantic(out[0], scale=(1.0, 1.0), width=80, height=48, labels=p.info.labels)
    covered = sum(r["area"] for r in rows)
    background = (resize_nearest(out[0]["classes"], 48, 80) == 0).sum()
    assert covered + background == 48 * 80  # every pixel: one class, or the background


def test_scores_are_the_argmax_softmax_probability_without_a_softmax_tensor() -> None:
    from models.semantic import classes_and_scores

    logits = torch.randn(2, 21, 9, 13, generator=torch.Generator().manual_seed(0)) * 4
    classes, scores = classes_and_scores(logits)
    top, want = logits.softmax(dim=1).max(dim=1)
    assert torch.equal(classes, want)
    assert torch.allclose(scores, top, atol=1e-6)


def test_heads_are_replaced_for_the_dataset_classes() -> None:
    for arch in ("lraspp_mobilenet_v3_large", "unet_tiny", "fcn_resnet50", "deeplabv3_tiny"):
        model, info = build_for_training(arch, init="random", num_classes=4)
        out = model(torch.rand(2, 3, 64, 64))["out"]
        assert out.shape == (2, 4, 64, 64) and model.training
        for path in SEMANTIC_ARCHS[arch].heads:
            assert model.get_submodule(path).out_channels == 4


def test_metrics_on_a_hand_made_case() -> None:
    gt = np.array([[0, 0, 1, 1],
                   [0, 0, 1, 1],
                   [2, 2, 2, 255]])  # 255: not scored
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, 1, 0],
                     [2, 2, 0, 2]])
    conf = confusion(gt, pred, 3)
    assert conf.tolist() == [[3, 1, 0], [1, 3, 0], [1, 0, 2]]
    m = segmentation_metrics(conf, ["bg", "a", "b"])
    # IoU: bg 3/(4+5-3)=0.5, a 3/(4+4-3)=0.6, b 2/(3+2-2)=2/3
    assert m["pixel_accuracy"] == pytest.approx(8 / 11)
    assert m["mean_iou"] == pytest.approx((0.5 + 0.6 + 2 / 3) / 3)
    assert m["fw_iou"] == pytest.approx(4 / 11 * 0.5 + 4 / 11 * 0.6 + 3 / 11 * 2 / 3)
    assert m["per_class_iou"] == pytest.approx({"bg": 0.5, "a": 0.6, "b": 2 / 3})
    # a class neither in the gt nor predicted is not averaged in
    assert segmentation_metrics(confusion(gt, pred, 4))["mean_iou"] == pytest.approx(m["mean_iou"])
    perfect = segmentation_metrics(confusion(gt, np.where(gt == 255, 0, gt), 3))
    assert perfect["mean_iou"] == perfect["pixel_accuracy"] == perfect["fw_iou"] == 1.0


def test_class_map_to_rle_per_class_at_the_original_size() -> None:
    grid = np.zeros((4, 6), np.uint8)
    grid[1:3, 1:3] = 2
    grid[0, 5] = 3
    scores = np.full((4, 6), 0.9, np.float16)
    scores[0, 5] = 0.6
    rows = encode_semantic({"classes": grid, "scores": scores}, scale=(2.0, 2.0), width=12,
                           height=8, labels=LABELS)
    assert [(r["label"], r["label_name"]) for r in rows] == [(2, "ellipse"), (3, "triangle")]
    full = np.kron(grid, np.ones((2, 2), np.uint8))  # nearest upscale by 2
    for r in rows:
        mask = rle_to_mask(r["mask"])
        assert mask.shape == (8, 12) and r["mask"]["size"] == [8, 12]
        assert np.array_equal(mask > 0, full == r["label"])
        assert r["area"] == int((full == r["label"]).sum())
    assert rows[0]["mean_score"] == pytest.approx(0.9, abs=1e-3)
    assert rows[1]["mean_score"] == pytest.approx(0.6, abs=1e-3)


def test_synth_class_maps_are_the_instance_masks(tmp_path: Path) -> None:
    train, _ = write_dataset(tmp_path / "d", images=16, width=64, height=64)
    gt = json.loads(train.read_text())
    ds = SemanticDataset(train, size=64, train=False)
    assert ds.vocab.names == LABELS
    from pycocotools import mask as mask_utils

    for i, record in enumerate(gt["images"][:4]):
        stored = np.asarray(Image.open(train.parent / record["class_map"]))
        painted = np.zeros_like(stored)
        for ann in gt["annotations"]:
            if ann["image_id"] == record["id"]:
                painted[mask_utils.decode(ann["segmentation"]) > 0] = ann["category_id"]
        assert np.array_equal(stored, painted) and (stored > 0).any()
        image, classes = ds.pair(i)
        assert classes.shape == image.shape[:2] and np.array_equal(classes, stored)
    record = gt["images"][0]  # without the label PNG, the same map comes from the masks
    from pipelines.coco import gt_class_map

    del ds.coco.imgs[record["id"]]["class_map"]
    assert np.array_equal(gt_class_map(ds.coco, record["id"], str(train.parent), ds.classes),
                          np.asarray(Image.open(train.parent / record["class_map"])))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small shapes dataset (PNG: decoded the same way everywhere)."""
    return write_dataset(tmp_path_factory.mktemp("shapes") / "d", images=240, width=64, height=64,
                         seed=3, ext=".png")


@pytest.mark.slow  # 300 training steps per arch: ~28 s each; `make test-all` runs them
@pytest.mark.parametrize("arch", ["unet_tiny", "deeplabv3_tiny"])
def test_a_model_trained_here_segments_held_out_images(shapes: tuple[Path, Path], arch: str) -> None:
    """The small U-Net, and DeepLabV3's ASPP head on a small CNN, trained for 300 steps on
    synthetic shapes: held-out images' mean IoU well above an untrained model's."""
    train, val = shapes
    ds = SemanticDataset(train, size=64, train=True)
    held_out = SemanticDataset(val, size=64, train=False, vocab=ds.vocab)
    pairs = held_out.pairs(list(range(len(held_out))))
    torch.manual_seed(0)
    model, _ = build_for_training(arch, init="random", num_classes=4, image_size=64)
    before = segmentation_metrics(evaluate_model(model, pairs, 4, min_size=64, max_size=128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=ds.ignore)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    steps = 0
    while steps < 300:
        for x, y in loader:
            loss = loss_fn(model(x)["out"], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == 300:
                break
    after = segmentation_metrics(evaluate_model(model, pairs, 4, min_size=64, max_size=128), LABELS)
    assert after["mean_iou"] >= 0.6 and after["mean_iou"] > before["mean_iou"] + 0.3, (before, after)
    assert after["pixel_accuracy"] > 0.9
    assert set(after["per_class_iou"]) == set(LABELS)


def _annotate_and_eval(val: Path, checkpoint: Path, out: Path, *more: str) -> dict:
    """`lakelens annotate` the split's images with the checkpoint (and `more` arguments),
    then `lakelens eval`: the semantic part of DIR/eval.json."""
    tasks = "semantic,embed" if "--index" in more else "semantic"
    proc = lakelens("annotate", str(val.parent / "images"), "--out", str(out), "--tasks", tasks,
                    "--weights", f"semantic={checkpoint}", "--num-cpus", "2", *more)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = lakelens("eval", str(out), "--gt", str(val))
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "mean IoU" in ev.stdout
    return json.loads((out / "eval.json").read_text())["tasks"]["semantic"]


@pytest.mark.slow  # ~27 s
def test_a_checkpoint_annotates_and_eval_scores_it_as_the_model_does(
        shapes: tuple[Path, Path], tmp_path: Path) -> None:
    """A 4-class U-Net checkpoint (seeded, untrained: what it predicts does not matter,
    only that every path agrees) -> annotate --tasks semantic,embed --index -> eval's mean
    IoU equals the one computed straight from the model on the same images, and `serve`'s
    region filter picks exactly the images whose table rows have that class over min_area."""
    _, val = shapes
    torch.manual_seed(5)
    model = UNet(num_classes=4).eval()
    with torch.no_grad():  # bias the head so that every class shows up somewhere
        model.head.bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0]))
    ckpt = tmp_path / "unet.pt"
    save_checkpoint(ckpt, model.state_dict(), {"arch": "unet_tiny", "task": "semantic",
                                               "labels": list(LABELS), "image_size": 96})
    loaded, info = build_semantic("unet_tiny", weights=str(ckpt))
    assert info.labels == LABELS and info.input_size == (96, 192)
    held_out = SemanticDataset(val, size=96, train=False)
    expected = segmentation_metrics(evaluate_model(
        loaded, held_out.pairs(list(range(len(held_out)))), 4, min_size=96, max_size=192), LABELS)

    out = tmp_path / "lake-table"
    report = _annotate_and_eval(val, ckpt, out, "--arch", "embed=tiny", "--weights", "embed=random",
                                "--index", str(tmp_path / "index"))
    assert report["images"] == len(held_out) and report["size_mismatch"] == 0
    for key in ("mean_iou", "pixel_accuracy", "fw_iou"):
        assert report["stats"][key] == pytest.approx(expected[key], abs=1e-9), key
    assert 0.0 < report["stats"]["mean_iou"] < 1.0

    from index.store import open_index
    from pipelines.lake.table import open_table
    from pipelines.serve.app import ApiError, make_filter
    from pipelines.serve.facets import Facets, Filter

    index, table = open_index(str(tmp_path / "index")), open_table(str(out))
    facets = Facets(table, index.ids)
    rows = table.current_table(["image_id", "width", "height", "semantic"]).to_pylist()
    assert set(facets.region_counts()) <= set(CATEGORIES) and facets.region_counts()
    def frac(r: dict, name: str) -> float:
        return max([s["area"] / (r["width"] * r["height"]) for s in r["semantic"] or []
                    if s["label_name"] == name] or [0.0])

    median = float(np.median([frac(r, "ellipse") for r in rows]))
    sizes = []
    for region, min_area in [("ellipse", 0.0), ("ellipse", median), ("rectangle", 0.2), ("triangle", 0.5)]:
        want = {r["image_id"] for r in rows if any(
            s["label_name"] == region and s["area"] / (r["width"] * r["height"]) >= min_area
            for s in r["semantic"] or [])}
        mask = facets.mask(Filter(region=region, min_area=min_area))
        got = {index.ids.image_ids[int(i)].as_py() for i in np.flatnonzero(mask)}
        assert got == want, (region, min_area)
        sizes.append(len(got))
    assert 0 < sizes[1] < len(rows), sizes  # the median area splits the lake
    assert facets.region_counts()["ellipse"] == len(
        {r["image_id"] for r in rows if any(s["label_name"] == "ellipse" for s in r["semantic"] or [])})
    with pytest.raises(LakelensError, match="unknown region 'sky'"):
        facets.mask(Filter(region="sky"))
    with pytest.raises(ApiError, match="min_area must be in"):
        make_filter(region="ellipse", min_area=1.5)


def test_a_version_2_table_migrates_with_null_semantic(tmp_path: Path) -> None:
    from deltalake import DeltaTable, write_deltalake

    from pipelines.lake import results
    from pipelines.lake.table import LEGACY_DIR, META_FILE, open_table
    from pipelines.lake.upkeep import migrate
    from pipelines.schema import LEGACY_COLUMNS, TABLE_SCHEMA

    out = tmp_path / "old"
    legacy = [pa.field("bucket", pa.int32()), pa.field("is_current", pa.bool_())]
    old_schema = pa.schema([f for f in TABLE_SCHEMA if f.name not in ("semantic", "reason")] + legacy)
    assert {"bucket", "is_current"} <= set(LEGACY_COLUMNS)
    DeltaTable.create(str(out / LEGACY_DIR), old_schema, partition_by=["bucket"])
    row = {f.name: None for f in old_schema} | {
        "image_id": "a" * 32, "bucket": 3, "uri": "/x.jpg", "status": "ok", "width": 4, "height": 3,
        "is_current": True, "committed_in": 1}
    write_deltalake(str(out / LEGACY_DIR), pa.Table.from_pylist([row], schema=old_schema), mode="append")
    (out / META_FILE).write_text(json.dumps({"schema_version": "2", "buckets": 16,
                                             "embedding_dim": None, "models": {}}))
    assert migrate(str(out))["rows"] == 1
    table = open_table(str(out))
    got = table.current_table(["image_id", "semantic", "width"])
    assert got.column("semantic").to_pylist() == [None] and got.column("width").to_pylist() == [4]
    assert got.schema.field("semantic").type == TABLE_SCHEMA.field("semantic").type
    assert results.query(str(out), "SELECT count(*) AS n, count(semantic) AS s FROM results"
                         ).to_pylist() == [{"n": 1, "s": 0}]


def test_cli_refuses_an_unknown_semantic_arch_in_one_line(tmp_path: Path) -> None:
    proc = lakelens("annotate", str(tmp_path), "--out", str(tmp_path / "o"), "--tasks", "semantic",
                    "--arch", "semantic=segnet")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "lakelens: error: unknown semantic arch 'segnet'; choose from " + ", ".join(sorted(SEMANTIC_ARCHS))]


def test_train_semantic_mistakes_are_one_line(tmp_path: Path) -> None:
    from models.errors import LakelensError
    from pipelines.train import TrainConfig

    with pytest.raises(LakelensError, match="choose from"):
        TrainConfig(kind="semantic", task="semantic", arch="segnet", data=".", out=str(tmp_path))
    with pytest.raises(LakelensError, match="--batch-size 2 or more"):
        TrainConfig(kind="semantic", task="semantic", arch="deeplabv3_tiny", batch_size=1,
                    init="random", data=".", out=str(tmp_path))
    proc = lakelens("train", "semantic", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                    "--arch", "unet_tiny", "--init", "random")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "lacks" in proc.stderr


@pytest.mark.slow
def test_train_semantic_with_ray_train_then_annotate_and_eval(tmp_path: Path) -> None:
    """`lakelens train semantic` (2 DDP workers) -> model.pt -> annotate -> eval: the
    table's mean IoU is the one the training run reported for its best epoch."""
    train, val = write_dataset(tmp_path / "d", images=200, width=64, height=64, seed=1, ext=".png")
    run = tmp_path / "run"
    proc = lakelens("train", "semantic", "--data", str(tmp_path / "d"), "--out", str(run),
                    "--arch", "unet_tiny", "--init", "random", "--epochs", "3", "--workers", "2",
                    "--batch-size", "8", "--image-size", "64", "--max-steps-per-epoch", "40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    best = metrics["best"]
    # all background scores ~0.21 (its IoU ~0.85 / 4 classes): past that, it learned shapes
    assert best["mean_iou"] > 0.3, metrics["history"]
    stats = _annotate_and_eval(val, run / "model.pt", tmp_path / "lake-table")["stats"]
    assert stats["mean_iou"] == pytest.approx(best["mean_iou"], abs=1e-6)
    assert stats["pixel_accuracy"] == pytest.approx(best["pixel_accuracy"], abs=1e-6)


@pytest.mark.gpu
def test_cuda_class_maps_match_cpu_within_autocast_tolerance() -> None:
    """bf16/fp16 autocast on CUDA: the same argmax as fp32 on CPU for nearly every pixel
    (random weights: near-ties may flip under reduced precision)."""
    images = [np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8) for i in range(3)]
    cpu = SemanticPredictor("deeplabv3_mobilenet_v3_large", weights="random", image_size=96,
                            device="cpu")(images)
    gpu_pred = SemanticPredictor("deeplabv3_mobilenet_v3_large", weights="random", image_size=96,
                                 device="cuda")
    assert gpu_pred.device.type == "cuda"
    gpu = gpu_pred(images)
    for a, b in zip(cpu, gpu, strict=True):
        assert a["classes"].shape == b["classes"].shape
        assert (a["classes"] == b["classes"]).mean() > 0.98
        assert np.abs(a["scores"].astype(np.float32) - b["scores"].astype(np.float32)).mean() < 0.02
