"""Model outputs (in the pixels the model saw) to result structs in original pixels."""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from models.masks import crop_to_rle
from models.semantic import resize_nearest


def _label_name(labels: tuple[str, ...], label: int) -> str:
    return labels[label] if 0 <= label < len(labels) else f"class_{label}"


def _boxes(boxes: np.ndarray, sx: float, sy: float, width: int, height: int) -> np.ndarray:
    """float[N, 4] xyxy scaled to original pixels and clipped to the image."""
    out = boxes.astype(np.float32, copy=True).reshape(-1, 4)
    out[:, 0::2] = np.clip(out[:, 0::2] * sx, 0, width)
    out[:, 1::2] = np.clip(out[:, 1::2] * sy, 0, height)
    return out


def encode_detections(out: dict[str, Any], *, scale: tuple[float, float], width: int,
                      height: int, labels: tuple[str, ...]) -> list[dict]:
    boxes = _boxes(out["boxes"], *scale, width, height)
    return [{"box": box.tolist(), "label": int(label), "label_name": _label_name(labels, int(label)),
             "score": float(score)}
            for box, label, score in zip(boxes, out["labels"], out["scores"], strict=True)]


def encode_instances(out: dict[str, Any], *, scale: tuple[float, float], width: int,
                     height: int, labels: tuple[str, ...]) -> list[dict]:
    rows = encode_detections(out, scale=scale, width=width, height=height, labels=labels)
    gx, gy = out.get("mask_grid", (1.0, 1.0))
    sx, sy = scale[0] * gx, scale[1] * gy
    for row, (top, left, crop) in zip(rows, out["mask_crops"], strict=True):
        row["mask"] = crop_to_rle(crop, top, left, scale_y=sy, scale_x=sx,
                                  height=height, width=width)
    return rows


def encode_poses(out: dict[str, Any], *, scale: tuple[float, float], width: int,
                 height: int, labels: tuple[str, ...]) -> list[dict]:
    sx, sy = scale
    boxes = _boxes(out["boxes"], sx, sy, width, height)
    kps = out["keypoints"].astype(np.float32, copy=True)
    if kps.size:
        kps[..., 0] = np.clip(kps[..., 0] * sx, 0, width)
        kps[..., 1] = np.clip(kps[..., 1] * sy, 0, height)
    return [{"box": box.tolist(), "score": float(score), "keypoints": kp.reshape(-1).tolist()}
            for box, score, kp in zip(boxes, out["scores"], kps, strict=True)]


def encode_semantic(out: dict[str, Any], *, scale: tuple[float, float], width: int,
                    height: int, labels: tuple[str, ...]) -> list[dict]:
    """A class map on the model's grid (covering the whole image) -> one RLE mask per
    class present, at the original upright resolution; the background (class 0 when the
    labels name it so) is what no mask covers."""
    classes = np.asarray(out["classes"])
    full = resize_nearest(classes, height, width)
    skip = 0 if labels and labels[0] == "__background__" else None
    # per class, in one pass each: pixels in the original, score sum and pixels on the grid
    area = np.bincount(full.ravel().astype(np.int64))
    grid = classes.ravel().astype(np.int64)
    score_sum = np.bincount(grid, weights=np.asarray(out["scores"], np.float64).ravel(),
                            minlength=len(area))
    grid_px = np.bincount(grid, minlength=len(area))
    full_f = np.asfortranarray(full)
    rows = []
    for label in np.flatnonzero(area).tolist():
        if label == skip:
            continue
        rle = mask_utils.encode((full_f == label).astype(np.uint8, order="F"))
        rows.append({"label": label, "label_name": _label_name(labels, label),
                     "mask": {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")},
                     "area": int(area[label]),
                     "mean_score": float(score_sum[label] / grid_px[label]) if grid_px[label] else 0.0})
    return rows


def encode_embedding(out: np.ndarray, **_: Any) -> list[float]:
    return out.astype(np.float32).tolist()


ENCODERS = {"detect": encode_detections, "segment": encode_instances, "pose": encode_poses,
            "semantic": encode_semantic, "embed": encode_embedding}
