"""COCO-format training data (pycocotools): detection targets and metric-learning crops.

A dataset directory holds two splits in one of two layouts:
- lakelens (what `lakelens synth` writes): ``DIR/train/annotations.json`` and
  ``DIR/val/annotations.json``, image ``file_name``s relative to the JSON's folder (or its
  ``images/``);
- COCO 2017: ``DIR/annotations/instances_{train,val}2017.json`` (``person_keypoints_*``
  for pose) with images in ``DIR/train2017`` and ``DIR/val2017``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import ImageOps, UnidentifiedImageError
from pycocotools.coco import COCO

from models.decode import open_image
from models.embedding import preprocess
from models.errors import LakelensError
from pipelines.coco import load_gt

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
DETECTION_TASKS = ("detect", "segment", "pose")
UNITS = ("auto", "image", "object")


class Split(NamedTuple):
    annotations: Path  # the COCO JSON
    images: Path  # the folder its file_names are relative to


def split_paths(data: str, task: str = "detect") -> dict[str, Split]:
    """{"train": Split, "val": Split} of a dataset directory, or a clear error."""
    root = Path(data)
    layout = ("it must hold train/annotations.json and val/annotations.json (see `lakelens "
              "synth`), or COCO 2017's annotations/instances_{train,val}2017.json")
    if not root.is_dir():
        raise LakelensError(f"--data {data!r} is not a directory; {layout}")
    ours = {s: Split(root / s / "annotations.json", root / s) for s in SPLITS}
    prefix = "person_keypoints" if task == "pose" else "instances"
    coco = {s: Split(root / "annotations" / f"{prefix}_{s}2017.json", root / f"{s}2017") for s in SPLITS}
    for splits in (ours, coco):
        if all(sp.annotations.is_file() for sp in splits.values()):
            return splits
    missing = [str(sp.annotations) for sp in ours.values() if not sp.annotations.is_file()]
    raise LakelensError(f"--data {data!r} lacks {', '.join(missing)}; {layout}")


def _image_path(root: Path, file_name: str) -> Path:
    direct = root / file_name
    return direct if direct.exists() else root / "images" / file_name


def _resolve_images(coco: COCO, split: Split) -> dict[int, Path]:
    paths = {im["id"]: _image_path(split.images, im["file_name"]) for im in coco.dataset["images"]}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise LakelensError(f"{len(missing)} images listed in {split.annotations} are missing, "
                            f"e.g. {missing[0]}")
    return paths


def as_split(split: Split | str | Path) -> Split:
    """A Split, or a JSON path whose file_names are relative to its folder."""
    if isinstance(split, Split):
        return split
    return Split(Path(split), Path(split).parent)


def read_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [H, W, 3], upright (EXIF orientation applied, as annotate reads images). When
    the annotation file gives the image's (width, height) and it is the stored size, not
    the upright one, the annotations were drawn on the stored pixels: those are returned.
    An unreadable training image stops training with its name."""
    try:
        with open_image(Path(path).read_bytes()) as im:  # the decoder policy, not every plugin
            upright = ImageOps.exif_transpose(im)
            if size is not None and upright.size != im.size and tuple(size) == im.size:
                upright = im
            return np.asarray(upright.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise LakelensError(f"cannot read training image {path}: {e}") from e


def _stated_size(record: dict) -> tuple[int, int] | None:
    """(width, height) of a COCO image record, when it states both."""
    w, h = record.get("width"), record.get("height")
    return (int(w), int(h)) if w and h else None


@dataclass(frozen=True)
class Vocabulary:
    """Contiguous training labels (1..C; 0 is background) for COCO category ids."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]  # index = label: "__background__", then the categories
    keypoint_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def label_of(self, category_id: int) -> int:
        return self.category_ids.index(category_id) + 1

    def category_of(self, label: int) -> int:
        return self.category_ids[label - 1]


def vocabulary(coco: COCO, task: str) -> Vocabulary:
    """The categories to learn: all of them, or for pose those that name keypoints."""
    cats = sorted(coco.dataset.get("categories", []), key=lambda c: c["id"])
    keypoint_names: tuple[str, ...] = ()
    if task == "pose":
        cats = [c for c in cats if c.get("keypoints")]
        if not cats:
            raise LakelensError("task pose needs categories with 'keypoints' names; this dataset has none")
        keypoint_names = tuple(cats[0]["keypoints"])
        odd = [c["name"] for c in cats if tuple(c["keypoints"]) != keypoint_names]
        if odd:
            raise LakelensError(f"pose categories must share one keypoint list; {odd} differ from "
                                f"{cats[0]['name']!r}")
    if not cats:
        raise LakelensError("the dataset has no categories")
    return Vocabulary(tuple(c["id"] for c in cats),
                      ("__background__",) + tuple(c["name"] for c in cats), keypoint_names)


class DetectionDataset(torch.utils.data.Dataset):
    """(image float[3, H, W] in [0, 1], target) pairs as torchvision's R-CNNs train on.

    target: boxes float[N, 4] xyxy, labels int64[N] (vocabulary labels), image_id;
    segment: masks uint8[N, H, W]; pose: keypoints float[N, K, 3]. Crowd regions and
    degenerate boxes are left out. `train` adds horizontal flips (not for pose, whose
    keypoint names would swap sides).
    """

    def __init__(self, split: Split | str | Path, task: str, *, train: bool,
                 vocab: Vocabulary | None = None):
        if task not in DETECTION_TASKS:
            raise LakelensError(f"unknown detector task {task!r}; choose from {', '.join(DETECTION_TASKS)}")
        self.split = as_split(split)
        self.coco = load_gt(str(self.split.annotations))
        self.task = task
        self.train = train
        self.vocab = vocab or vocabulary(self.coco, task)
        self.paths = _resolve_images(self.coco, self.split)
        self.image_ids = sorted(self.paths)
        self.flip_order = keypoint_flip_order(self.vocab.keypoint_names)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.image_ids[i]
        pixels = read_rgb(self.paths[image_id], _stated_size(self.coco.imgs.get(image_id, {})))
        h, w = pixels.shape[:2]
        boxes, labels, masks, keypoints = [], [], [], []
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id], iscrowd=False)):
            if ann["category_id"] not in self.vocab.category_ids:
                continue
            if self.task == "pose" and not ann.get("num_keypoints", 0):
                continue
            x, y, bw, bh = ann["bbox"]
            x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.vocab.label_of(ann["category_id"]))
            if self.task == "segment":
                masks.append(self.coco.annToMask(ann))
            if self.task == "pose":
                keypoints.append(np.asarray(ann["keypoints"], dtype=np.float32).reshape(-1, 3))
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64),
                  "image_id": torch.tensor(image_id)}
        if self.task == "segment":
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(
                (0, h, w), dtype=torch.uint8)
        if self.task == "pose":
            k = len(self.vocab.keypoint_names)
            target["keypoints"] = (torch.from_numpy(np.stack(keypoints)) if keypoints
                                   else torch.zeros((0, k, 3)))
        flippable = self.task != "pose" or self.flip_order is not None
        if self.train and flippable and torch.rand(1).item() < 0.5:
            image, target = _hflip(image, target, self.flip_order)
        return image, target


def keypoint_flip_order(names: Sequence[str]) -> list[int] | None:
    """Where each keypoint goes when the image is mirrored: "left_x" <-> "right_x" (COCO's
    person), the others stay. None when the names pair no left with a right: what a
    keypoint means under a mirror is then unknown (the synthetic shapes' p0..p3 are
    corners whose order flips per shape), and such pose samples are not flipped."""
    index = {n: i for i, n in enumerate(names)}
    order, paired = [], False
    for name in names:
        for a, b in (("left", "right"), ("right", "left")):
            if a in name.split("_"):
                partner = "_".join(b if part == a else part for part in name.split("_"))
                if partner not in index:
                    return None
                order.append(index[partner])
                paired = True
                break
        else:
            order.append(index[name])
    return order if paired else None


def _hflip(image: torch.Tensor, target: dict[str, torch.Tensor],
           keypoint_order: list[int] | None = None) -> tuple[torch.Tensor, dict]:
    """The image mirrored left-right, with its boxes (xyxy) and masks, by torchvision's
    transforms.v2 on tv_tensors; keypoints by hand: x -> W - x in the boxes' continuous
    coordinates (v2 mirrors keypoints as pixel indices, W - 1 - x) and left/right swapped
    by `keypoint_order` (v2 does not swap). The other target entries are passed through.
    Returns plain tensors, in the format the detector loop expects."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    h, w = image.shape[-2:]
    sample = {"image": tv_tensors.Image(image),
              "boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w))}
    if "masks" in target:
        sample["masks"] = tv_tensors.Mask(target["masks"])
    # the functional flip: no draw from torch's RNG (the caller draws whether to flip)
    flipped = {k: v2.functional.horizontal_flip(v) for k, v in sample.items()}
    out = dict(target) | {k: flipped[k].as_subclass(torch.Tensor) for k in sample if k != "image"}
    if "keypoints" in target:
        if keypoint_order is None:
            raise ValueError("flipping keypoints needs their left/right order")
        kp = target["keypoints"].clone()
        kp[..., 0] = torch.where(kp[..., 2] > 0, w - kp[..., 0], kp[..., 0])
        out["keypoints"] = kp[:, keypoint_order]
    return flipped["image"].as_subclass(torch.Tensor), out


def collate(batch: list) -> tuple[list, list]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


@dataclass(frozen=True)
class EmbedItem:
    path: Path
    box: tuple[float, float, float, float] | None  # xywh of an object crop; None: whole image
    label: int
    size: tuple[int, int] | None = None  # (width, height) the annotation file states


def embed_items(split: Split | str | Path, unit: str = "auto") -> tuple[list[EmbedItem], str]:
    """What the embedder learns from: whole images grouped by the image's ``identity``, or
    object crops grouped by the annotation's ``identity`` (else its category).
    unit ``auto``: images when every image has an identity, else objects."""
    if unit not in UNITS:
        raise LakelensError(f"unknown --unit {unit!r}; choose from {', '.join(UNITS)}")
    split = as_split(split)
    json_path = split.annotations
    coco = load_gt(str(json_path))
    paths = _resolve_images(coco, split)
    images = coco.dataset["images"]
    if unit == "auto":
        unit = "image" if images and all("identity" in im for im in images) else "object"
    if unit == "image":
        lacking = [im["file_name"] for im in images if "identity" not in im]
        if lacking:
            raise LakelensError(f"--unit image needs an 'identity' on every image of {json_path}; "
                                f"{len(lacking)} lack one, e.g. {lacking[0]}")
        return [EmbedItem(paths[im["id"]], None, int(im["identity"]), _stated_size(im))
                for im in images], unit
    items = [EmbedItem(paths[a["image_id"]], tuple(a["bbox"]), int(a.get("identity", a["category_id"])),
                       _stated_size(coco.imgs.get(a["image_id"], {})))
             for a in coco.dataset["annotations"] if not a.get("iscrowd") and min(a["bbox"][2:]) >= 2]
    if not items:
        raise LakelensError(f"no object annotations with boxes in {json_path}")
    return items, unit


def contiguous_labels(items: list[EmbedItem]) -> tuple[list[EmbedItem], int]:
    """The items relabelled 0..C-1 (in the order of their labels), and C. Identities and
    category ids may be sparse or negative; a loss with a proxy or weight row per label
    needs them dense."""
    index = {y: i for i, y in enumerate(sorted({it.label for it in items}))}
    return [dataclasses.replace(it, label=index[it.label]) for it in items], len(index)


class EmbedDataset(torch.utils.data.Dataset):
    """(float[3, crop, crop] normalised, label). Evaluation sees exactly what annotate
    feeds the embedder (models.embedding.preprocess of the whole image or the crop);
    training adds a random crop of 70-100 % of the side and horizontal flips."""

    def __init__(self, items: list[EmbedItem], crop: int, *, train: bool):
        self.items = items
        self.crop = crop
        self.train = train

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [it.label for it in self.items]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.items[i]
        pixels = read_rgb(item.path, item.size)
        if item.box is not None:
            pixels = _pad_crop(pixels, item.box)
        t = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
        if self.train:
            h, w = t.shape[-2:]
            s = float(torch.empty(1).uniform_(0.7, 1.0))
            ch, cw = max(1, round(h * s)), max(1, round(w * s))
            top = int(torch.randint(0, h - ch + 1, (1,)))
            left = int(torch.randint(0, w - cw + 1, (1,)))
            t = t[:, top:top + ch, left:left + cw]
            if torch.rand(1).item() < 0.5:
                t = t.flip(-1)
        return preprocess([t], self.crop)[0], item.label


def _pad_crop(pixels: np.ndarray, box: tuple[float, float, float, float], pad: float = 0.1) -> np.ndarray:
    h, w = pixels.shape[:2]
    x, y, bw, bh = box
    x0, y0 = max(0, int(x - pad * bw)), max(0, int(y - pad * bh))
    x1, y1 = min(w, int(np.ceil(x + bw * (1 + pad)))), min(h, int(np.ceil(y + bh * (1 + pad))))
    return pixels[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]


def loader_workers(requested: int | None, cpus: float) -> int:
    """DataLoader worker processes per training worker: as asked, else one per CPU the
    training worker holds beyond its first (at least one, so decoding overlaps compute)."""
    if requested is not None:
        return requested
    return max(1, min(4, int(cpus) - 1))



class SemanticDataset(torch.utils.data.Dataset):
    """Per-pixel class maps for semantic segmentation: the images of a COCO split and
    their class maps (the split's label PNGs where records name one, else painted from the
    instance masks; see pipelines.coco.gt_class_map). Classes: 0 background, then the
    categories in id order (the Vocabulary's labels); IGNORE pixels are not scored.

    train=True: (image float[3, S, S] ImageNet-normalised, classes int64[S, S]) after
    resizing the shorter side to S, a random S x S crop (padded with IGNORE) and a random
    horizontal flip. `pairs()` gives the held-out (uint8 image, class map) pairs at the
    images' own size, for models.semantic.evaluate_model.
    """

    def __init__(self, split: Split | str | Path, *, size: int, train: bool,
                 vocab: Vocabulary | None = None, seed: int = 0):
        from pipelines.coco import IGNORE

        self.split = as_split(split)
        self.coco = load_gt(str(self.split.annotations))
        self.vocab = vocab or vocabulary(self.coco, "detect")
        self.classes = {c: n + 1 for n, c in enumerate(self.vocab.category_ids)}
        self.paths = _resolve_images(self.coco, self.split)
        self.image_ids = sorted(self.paths)
        self.size, self.train, self.ignore = size, train, IGNORE
        self.rng = np.random.default_rng(seed)
        if not self.image_ids:
            raise LakelensError(f"{self.split.annotations} lists no images")

    def __len__(self) -> int:
        return len(self.image_ids)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8[h, w, 3], uint8[h, w] classes) of image i, as annotated."""
        from pipelines.coco import gt_class_map

        image_id = self.image_ids[i]
        record = self.coco.imgs[image_id]
        image = read_rgb(self.paths[image_id], _stated_size(record))
        classes = gt_class_map(self.coco, image_id, str(self.split.images), self.classes)
        if classes.shape != image.shape[:2]:
            raise LakelensError(f"class map of {self.paths[image_id]} is {classes.shape[1]}x"
                                f"{classes.shape[0]}, the image {image.shape[1]}x{image.shape[0]}")
        return image, classes

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.nn.functional as F

        from models.semantic import standardise

        image, classes = self.pair(i)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
        y = torch.from_numpy(classes.astype(np.int64))
        h, w = y.shape
        s = self.size / min(h, w)
        th, tw = max(self.size, round(h * s)), max(self.size, round(w * s))
        x = F.interpolate(x[None], size=(th, tw), mode="bilinear", align_corners=False,
                          antialias=s < 1)[0]
        y = F.interpolate(y[None, None].float(), size=(th, tw), mode="nearest")[0, 0].long()
        rng = np.random.default_rng() if self.train else self.rng
        top = int(rng.integers(0, th - self.size + 1)) if self.train else (th - self.size) // 2
        left = int(rng.integers(0, tw - self.size + 1)) if self.train else (tw - self.size) // 2
        x = x[:, top:top + self.size, left:left + self.size]
        y = y[top:top + self.size, left:left + self.size]
        if self.train and rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return standardise(x), y

    def pairs(self, indices: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.pair(i) for i in indices]
