"""The synthetic dataset (splits, families) and the COCO training datasets read from it."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from models.detection import COCO_KEYPOINTS
from models.errors import LakelensError
from pipelines.synth import CATEGORIES, KEYPOINT_NAMES, write_dataset
from pipelines.train.datasets import (
    DetectionDataset,
    EmbedDataset,
    _hflip,
    embed_items,
    keypoint_flip_order,
    split_paths,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "d"
    write_dataset(root, images=40, seed=7, val_fraction=0.3, width=96, height=96)
    return root


def test_splits_hold_disjoint_families_drawn_whole(dataset: Path) -> None:
    families = {}
    for split in ("train", "val"):
        coco = json.loads((dataset / split / "annotations.json").read_text())
        objects = defaultdict(list)
        for a in coco["annotations"]:
            objects[a["image_id"]].append(a["identity"])
        by_family = defaultdict(set)
        for im in coco["images"]:
            by_family[im["identity"]].add(tuple(sorted(objects[im["id"]])))
        # every member of a family shows exactly the same objects
        assert all(len(v) == 1 for v in by_family.values()), by_family
        families[split] = set(by_family)
        assert all(n == 4 for n in Counter(im["identity"] for im in coco["images"]).values())
    assert len(families["val"]) == 3 and len(families["train"]) == 7
    assert not families["train"] & families["val"]


def test_same_seed_same_dataset(dataset: Path, tmp_path: Path) -> None:
    write_dataset(tmp_path / "again", images=40, seed=7, val_fraction=0.3, width=96, height=96)
    for split in ("train", "val"):
        assert (tmp_path / "again" / split / "annotations.json").read_text() == \
            (dataset / split / "annotations.json").read_text()
        assert (tmp_path / "again" / split / "images" / "000001.jpg").read_bytes() == \
            (dataset / split / "images" / "000001.jpg").read_bytes()


def test_synth_refuses_impossible_requests(tmp_path: Path) -> None:
    with pytest.raises(LakelensError, match="at least 8"):
        write_dataset(tmp_path, images=5)
    with pytest.raises(LakelensError, match="at most 5316"):
        write_dataset(tmp_path, images=6000)


@pytest.mark.parametrize("task", ["detect", "segment", "pose"])
def test_detection_targets_match_the_annotations(dataset: Path, task: str) -> None:
    paths = split_paths(str(dataset))
    ds = DetectionDataset(paths["val"], task, train=False)
    assert ds.vocab.names == ("__background__", *CATEGORIES)
    image, target = ds[0]
    anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[ds.image_ids[0]]))
    assert image.shape == (3, 96, 96) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert target["labels"].tolist() == [a["category_id"] for a in anns]
    x, y, w, h = anns[0]["bbox"]
    assert target["boxes"][0].tolist() == pytest.approx([x, y, x + w, y + h])
    if task == "segment":
        expected = mask_utils.decode(anns[0]["segmentation"])
        assert np.array_equal(target["masks"][0].numpy(), expected)
    if task == "pose":
        assert ds.vocab.keypoint_names == KEYPOINT_NAMES
        assert target["keypoints"].shape == (len(anns), 4, 3)


def test_training_flip_moves_boxes_and_masks_together(dataset: Path) -> None:
    ds = DetectionDataset(split_paths(str(dataset))["train"], "segment", train=True)
    torch.manual_seed(0)
    flips = 0
    for _ in range(8):
        image, target = ds[0]
        for box, mask in zip(target["boxes"], target["masks"], strict=True):
            ys, xs = np.nonzero(mask.numpy())
            assert box.tolist() == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], abs=1)
        plain = DetectionDataset(ds.split, "segment", train=False)[0][0]
        flips += not torch.equal(image, plain)
    assert 0 < flips < 8


def test_flip_moves_boxes_and_masks_with_the_pixels_exactly(dataset: Path) -> None:
    """transforms.v2's flip, pixel for pixel: the flipped image is the image mirrored, each
    mask is its mask mirrored, each box spans exactly its mirrored mask's columns."""
    image, target = DetectionDataset(split_paths(str(dataset))["train"], "segment", train=False)[0]
    flipped, out = _hflip(image, target)
    w = image.shape[-1]
    assert type(flipped) is torch.Tensor and type(out["boxes"]) is torch.Tensor
    assert torch.equal(flipped, image.flip(-1))
    assert torch.equal(out["masks"], target["masks"].flip(-1)) and out["masks"].dtype == torch.uint8
    assert torch.equal(out["labels"], target["labels"]) and torch.equal(out["image_id"], target["image_id"])
    x0, y0, x1, y1 = target["boxes"].unbind(1)
    assert torch.equal(out["boxes"], torch.stack([w - x1, y0, w - x0, y1], dim=1))
    for box, mask, old in zip(out["boxes"], out["masks"], target["masks"], strict=True):
        cols = np.nonzero(mask.numpy().any(0))[0]
        old_cols = np.nonzero(old.numpy().any(0))[0]
        assert (cols.min(), cols.max()) == (w - 1 - old_cols.max(), w - 1 - old_cols.min())
        assert box[0] <= cols.min() and cols.max() + 1 <= box[2]


def test_keypoints_flip_with_the_boxes_and_swap_left_and_right() -> None:
    """COCO's person: x -> W - x like the boxes' edges, left_* and right_* trade places,
    invisible keypoints stay (0, 0, 0); names with no left/right pair are not flipped."""
    order = keypoint_flip_order(COCO_KEYPOINTS)
    assert order is not None and [COCO_KEYPOINTS[i] for i in order[:5]] == [
        "nose", "right_eye", "left_eye", "right_ear", "left_ear"]
    assert keypoint_flip_order(KEYPOINT_NAMES) is None
    assert keypoint_flip_order(("left_hand", "nose")) is None  # a left without its right
    w = 40
    kp = torch.zeros(1, 17, 3)
    kp[0, 1] = torch.tensor([10.0, 5.0, 2.0])  # left_eye
    kp[0, 2] = torch.tensor([14.0, 5.0, 1.0])  # right_eye
    kp[0, 0] = torch.tensor([12.0, 8.0, 2.0])  # nose
    target = {"boxes": torch.tensor([[8.0, 2.0, 16.0, 12.0]]), "labels": torch.tensor([1]),
              "keypoints": kp}
    _, out = _hflip(torch.zeros(3, 20, w), target, order)
    assert out["boxes"].tolist() == [[24.0, 2.0, 32.0, 12.0]]
    assert out["keypoints"][0, 0].tolist() == [28.0, 8.0, 2.0]
    assert out["keypoints"][0, 1].tolist() == [w - 14.0, 5.0, 1.0]  # the old right eye, mirrored
    assert out["keypoints"][0, 2].tolist() == [w - 10.0, 5.0, 2.0]
    assert out["keypoints"][0, 3:].abs().sum() == 0
    with pytest.raises(ValueError, match="left/right order"):
        _hflip(torch.zeros(3, 20, w), target)


def test_embed_items_choose_images_when_identified(dataset: Path) -> None:
    paths = split_paths(str(dataset))
    items, unit = embed_items(paths["val"])
    assert unit == "image" and len(items) == 12 and all(it.box is None for it in items)
    objects, unit = embed_items(paths["val"], "object")
    assert unit == "object" and all(it.box is not None for it in objects)
    x, label = EmbedDataset(objects, 64, train=True)[0]
    assert x.shape == (3, 64, 64) and label == objects[0].label
    with pytest.raises(LakelensError, match="choose from auto, image, object"):
        embed_items(paths["val"], "crop")


def test_coco_2017_layout_is_read_too(dataset: Path, tmp_path: Path) -> None:
    """annotations/instances_{train,val}2017.json with images in train2017/ and val2017/."""
    (tmp_path / "annotations").mkdir()
    for split in ("train", "val"):
        coco = json.loads((dataset / split / "annotations.json").read_text())
        (tmp_path / f"{split}2017").mkdir()
        for im in coco["images"]:
            name = Path(im["file_name"]).name
            (tmp_path / f"{split}2017" / name).write_bytes((dataset / split / im["file_name"]).read_bytes())
            im["file_name"] = name
        (tmp_path / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
    paths = split_paths(str(tmp_path))
    assert paths["val"].images == tmp_path / "val2017"
    ds = DetectionDataset(paths["val"], "detect", train=False)
    assert len(ds) == 12 and ds[0][1]["boxes"].shape[1] == 4
    with pytest.raises(LakelensError, match="train/annotations.json"):
        split_paths(str(tmp_path), "pose")  # pose reads person_keypoints_*.json


def test_missing_split_names_what_a_dataset_holds(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(LakelensError, match="val/annotations.json"):
        split_paths(str(tmp_path))


def _rotated_jpeg(path: Path) -> np.ndarray:
    """A 64x32 stored image whose EXIF says "rotate 90 clockwise to view" (upright 32x64);
    returns the stored pixels."""
    from PIL import Image

    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :8] = 255  # a white band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    return stored


def test_training_reads_images_upright_unless_annotated_on_the_stored_pixels(tmp_path: Path) -> None:
    from pipelines.train.datasets import read_rgb

    _rotated_jpeg(tmp_path / "r.jpg")
    upright = read_rgb(tmp_path / "r.jpg")
    assert upright.shape == (64, 32, 3)  # as annotate reads it
    assert upright[:8].mean() > 200 and upright[-8:].mean() < 50  # the band is now on top
    assert read_rgb(tmp_path / "r.jpg", (32, 64)).shape == (64, 32, 3)  # COCO states upright
    assert read_rgb(tmp_path / "r.jpg", (64, 32)).shape == (32, 64, 3)  # COCO states stored


def test_detection_dataset_boxes_fit_the_upright_image(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    _rotated_jpeg(tmp_path / "images" / "r.jpg")
    gt = {"images": [{"id": 1, "file_name": "images/r.jpg", "width": 32, "height": 64}],
          "categories": [{"id": 1, "name": "band"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 32, 8],
                           "area": 256, "iscrowd": 0}]}
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    image, target = DetectionDataset(tmp_path / "ann.json", "detect", train=False)[0]
    assert tuple(image.shape) == (3, 64, 32)
    assert target["boxes"].tolist() == [[0.0, 0.0, 32.0, 8.0]]
    assert image[:, :8].mean() > 0.8  # the annotated band is where the box says
