"""Synthetic scenes with known boxes, masks and keypoints; a small COCO-format image lake.

Shapes (rectangle, ellipse, triangle) in saturated colours on a dark, noisy background,
never overlapping, so every box and mask is exact. Each object has four keypoints:
rectangle corners, ellipse extremes (top, right, bottom, left), triangle vertices plus
its centroid. Deterministic for a seed.

Each image of a training dataset (`write_dataset`) also gets a per-pixel class map
(``OUT/labels/<split>/<name>.png``, named by the image's ``class_map`` in the JSON,
relative to the JSON's folder): 0 is the background, else the object's COCO category id,
for semantic segmentation. The maps live outside the split folders, so annotating
``OUT/train`` does not take them for images. A lake to annotate (`write_lake`) has none
(its class maps follow from the instance masks, exactly).

For retrieval, images come in *families*: a family is a fixed set of one to three
(shape, colour) objects, and its members place and size them differently on different
backgrounds. `write_dataset` writes train and val splits whose families are disjoint
(held-out identities, the protocol of CUB-200 / Cars196 / SOP).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from models.errors import LakelensError

logger = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = ("rectangle", "ellipse", "triangle")
COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 40, 40), (40, 200, 60), (50, 90, 240), (240, 210, 30), (220, 60, 220), (40, 220, 230))
KEYPOINT_NAMES: tuple[str, ...] = ("p0", "p1", "p2", "p3")
SKELETON: tuple[tuple[int, int], ...] = ((1, 2), (2, 3), (3, 4), (4, 1))


@dataclass(frozen=True)
class SynthObject:
    category_id: int  # 1-based index into CATEGORIES
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (pixel edges) of the mask
    mask: np.ndarray  # bool[h, w]
    keypoints: np.ndarray  # float32[4, 3]: x, y, v=2
    identity: int  # shape x colour: the "same thing" for retrieval

    @property
    def category(self) -> str:
        return CATEGORIES[self.category_id - 1]


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8[h, w, 3]
    objects: list[SynthObject]


Family = tuple[tuple[int, int], ...]  # (category_id, colour index) per object


def make_scene(rng: np.random.Generator, *, width: int = 160, height: int = 120,
               objects: tuple[int, int] = (1, 3), size: tuple[float, float] = (0.25, 0.5),
               categories: tuple[str, ...] = CATEGORIES, family: Family | None = None) -> Scene:
    """One scene: `objects` = (min, max) count; `size` = object side as a fraction of the
    shorter image side. With `family`, exactly those objects are drawn (shrunk until they
    fit) and `objects`/`categories` are ignored."""
    base = rng.integers(10, 50, size=3)
    noise = rng.integers(0, 25, size=(height, width, 1))
    canvas = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    placed: list[tuple[float, float, float, float]] = []
    result: list[SynthObject] = []
    if family is None:
        count = int(rng.integers(objects[0], objects[1] + 1))
        family = tuple((CATEGORIES.index(categories[int(rng.integers(len(categories)))]) + 1,
                        int(rng.integers(len(COLORS)))) for _ in range(count))
        tries = 1
    else:
        tries = 8  # a family's objects must all be drawn: shrink and retry
    for cat_id, color_idx in family:
        scale = 1.0
        for _ in range(tries):
            for _attempt in range(30):
                side = float(rng.uniform(*size)) * min(width, height) * scale
                bw, bh = side * rng.uniform(0.7, 1.3), side * rng.uniform(0.7, 1.3)
                x0, y0 = rng.uniform(1, width - bw - 1), rng.uniform(1, height - bh - 1)
                cand = (x0 - 2, y0 - 2, x0 + bw + 2, y0 + bh + 2)
                if all(_disjoint(cand, p) for p in placed):
                    break
            else:
                scale *= 0.8
                continue
            break
        else:
            continue
        placed.append(cand)
        cat = CATEGORIES[cat_id - 1]
        mask_im = Image.new("L", (width, height), 0)
        mdraw = ImageDraw.Draw(mask_im)
        x1, y1 = x0 + bw, y0 + bh
        if cat == "rectangle":
            pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
            mdraw.polygon(pts, fill=255)
            kps = pts
        elif cat == "ellipse":
            mdraw.ellipse((x0, y0, x1, y1), fill=255)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            kps = [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
        else:
            pts = [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
            mdraw.polygon(pts, fill=255)
            kps = pts + [(sum(p[0] for p in pts) / 3, sum(p[1] for p in pts) / 3)]
        mask = np.asarray(mask_im) > 0
        if not mask.any():
            continue
        draw.bitmap((0, 0), mask_im, fill=COLORS[color_idx])
        ys, xs = np.nonzero(mask)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        kp = np.array([[x, y, 2.0] for x, y in kps], dtype=np.float32)
        result.append(SynthObject(cat_id, box, mask, kp, (cat_id - 1) * len(COLORS) + color_idx))
    return Scene(np.asarray(canvas), result)


def _disjoint(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def coco_categories() -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": "shape",
             "keypoints": list(KEYPOINT_NAMES), "skeleton": [list(s) for s in SKELETON]}
            for i, name in enumerate(CATEGORIES)]


def write_lake(out_dir: str | Path, *, images: int, seed: int = 0, width: int = 160,
               height: int = 120, ext: str = ".jpg") -> Path:
    """Write `images` random scenes and a COCO `annotations.json`; returns the JSON's path."""
    rng = np.random.default_rng(seed)
    scenes = (make_scene(rng, width=width, height=height) for _ in range(images))
    return _write_split(Path(out_dir), scenes, [None] * images, ext=ext, class_maps=False)


def all_families() -> list[Family]:
    """Every multiset of one to three (shape, colour) objects, in a fixed order."""
    singles = [(c, k) for c in range(1, len(CATEGORIES) + 1) for k in range(len(COLORS))]
    return [tuple(f) for n in (1, 2, 3) for f in itertools.combinations_with_replacement(singles, n)]


def write_dataset(out_dir: str | Path, *, images: int, seed: int = 0, val_fraction: float = 0.25,
                  family_size: int = 4, width: int = 128, height: int = 128,
                  ext: str = ".jpg") -> tuple[Path, Path]:
    """Train and val splits (OUT/train, OUT/val: images/ and annotations.json each) whose
    image families are disjoint. Returns the two annotation paths."""
    if images < 2 * family_size:
        raise LakelensError(f"--images must be at least {2 * family_size} (two families of "
                            f"{family_size}: one train, one val), got {images}")
    if not 0.0 < val_fraction < 1.0:
        raise LakelensError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    families = all_families()
    n_fam = math.ceil(images / family_size)
    if n_fam > len(families):
        raise LakelensError(f"--images {images} needs {n_fam} families of {family_size}; the "
                            f"generator has {len(families)}: ask for at most "
                            f"{len(families) * family_size} images")
    chosen = [families[i] for i in rng.permutation(len(families))[:n_fam]]
    n_val = min(n_fam - 1, max(1, round(n_fam * val_fraction)))
    sizes = [family_size] * n_fam
    sizes[-1] = images - family_size * (n_fam - 1)
    split_of = ["val"] * n_val + ["train"] * (n_fam - n_val)
    out = Path(out_dir)
    paths = []
    for split in ("train", "val"):
        fams = [f for f in range(n_fam) if split_of[f] == split]
        ids = [f for f in fams for _ in range(sizes[f])]
        order = rng.permutation(len(ids))
        ids = [ids[i] for i in order]
        split_rng = np.random.default_rng([seed, 1 if split == "train" else 2])
        scenes = (make_scene(split_rng, width=width, height=height, size=(0.2, 0.45),
                             family=chosen[f]) for f in ids)
        paths.append(_write_split(out / split, scenes, ids, ext=ext, class_maps=True))
    return paths[0], paths[1]


def _write_split(out: Path, scenes: Iterable[Scene], identities: Sequence[int | None],
                 *, ext: str, class_maps: bool) -> Path:
    (out / "images").mkdir(parents=True, exist_ok=True)
    if class_maps:
        (out.parent / "labels" / out.name).mkdir(parents=True, exist_ok=True)
    coco: dict = {"images": [], "annotations": [], "categories": coco_categories()}
    for i, (scene, identity) in enumerate(zip(scenes, identities, strict=True)):
        height, width = scene.image.shape[:2]
        name = f"images/{i:06d}{ext}"
        Image.fromarray(scene.image).save(out / name, quality=95)
        entry = {"id": i + 1, "file_name": name, "width": width, "height": height}
        if class_maps:
            class_map = np.zeros((height, width), np.uint8)  # 0: background
            for obj in scene.objects:
                class_map[obj.mask] = obj.category_id
            entry["class_map"] = f"../labels/{out.name}/{i:06d}.png"
            Image.fromarray(class_map).save(out.parent / "labels" / out.name / f"{i:06d}.png")
        if identity is not None:
            entry["identity"] = identity
        coco["images"].append(entry)
        for obj in scene.objects:
            rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
            x0, y0, x1, y1 = obj.box
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": i + 1,
                "category_id": obj.category_id, "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": float(obj.mask.sum()), "iscrowd": 0,
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                "keypoints": obj.keypoints.reshape(-1).tolist(), "num_keypoints": 4,
                "identity": obj.identity,
            })
    path = out / "annotations.json"
    tmp = out / ".annotations.json.tmp"
    tmp.write_text(json.dumps(coco))
    os.replace(tmp, path)
    logger.info("wrote %d images and %d objects to %s", len(coco["images"]),
                len(coco["annotations"]), out)
    return path
