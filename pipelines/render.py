"""PNG overlays of results (masks, boxes, labels, skeletons) for a person to look at."""

from __future__ import annotations

import hashlib
import logging
import os
import re

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from models.decode import decode_image
from models.masks import rle_to_mask
from pipelines.coco import read_results
from pipelines.lake.sources import read_bytes

logger = logging.getLogger(__name__)

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
COCO_SKELETON = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
                 (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4),
                 (3, 5), (4, 6)]  # 0-based pairs of COCO's 17 person keypoints
MAX_SIDE = 1600  # overlays of larger images are drawn reduced
MASK_ALPHA = 0.45


def skeleton(k: int) -> list[tuple[int, int]]:
    """COCO's person skeleton for 17 keypoints, else a closed loop through them in order."""
    return COCO_SKELETON if k == 17 else [(i, (i + 1) % k) for i in range(k)] if k > 1 else []


def render_row(row: dict, image: np.ndarray) -> Image.Image:
    """Draw one results row over its upright image (uint8[h, w, 3], any scale)."""
    h, w = image.shape[:2]
    sx, sy = w / row["width"], h / row["height"]
    canvas = image.astype(np.float32)
    for n, inst in enumerate(row["instances"] or []):
        mask = rle_to_mask(inst["mask"])
        if mask.shape != (h, w):
            mask = np.asarray(Image.fromarray(mask * 255).resize((w, h), Image.Resampling.NEAREST)) > 0
        color = np.array(PALETTE[n % len(PALETTE)], np.float32)
        canvas[mask > 0] = canvas[mask > 0] * (1 - MASK_ALPHA) + color * MASK_ALPHA
    out = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    boxes = [(d, d.get("label_name") or "") for d in (row["detections"] or [])]
    boxes += [(d, d.get("label_name") or "") for d in (row["instances"] or [])]
    for n, (det, name) in enumerate(boxes):
        x0, y0, x1, y1 = det["box"]
        color = PALETTE[n % len(PALETTE)]
        draw.rectangle((x0 * sx, y0 * sy, x1 * sx, y1 * sy), outline=color, width=2)
        draw.text((x0 * sx + 2, y0 * sy + 1), f"{name} {det['score']:.2f}", fill=color)
    for pose in row["poses"] or []:
        kp = np.asarray(pose["keypoints"], np.float32).reshape(-1, 3)
        pts = [(x * sx, y * sy) for x, y, _ in kp]
        for a, b in skeleton(len(pts)):
            draw.line((pts[a], pts[b]), fill=(255, 255, 255), width=2)
        for x, y in pts:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(255, 0, 0))
    return out


SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def file_name(image_id: str) -> str:
    """OUT/<image_id>.png, or a hash of the id when it is not a plain file name: a table's
    ids never steer a write outside --out (`../x`, `/etc/x`, NUL, separators)."""
    if SAFE_NAME.fullmatch(image_id):
        return f"{image_id}.png"
    return f"id-{hashlib.sha256(image_id.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}.png"


def render(results: str, out: str, *, limit: int | None = None) -> tuple[int, int]:
    """Write OUT/<image_id>.png for the first `limit` rows; returns (written, unreadable)."""
    table: pa.Table = read_results(results, extra=["image_id"], limit=limit)
    os.makedirs(out, exist_ok=True)
    written = failed = 0
    for row in table.to_pylist():
        try:
            image = decode_image(read_bytes(row["uri"]), long=MAX_SIDE).pixels
        except (OSError, ValueError) as e:
            logger.warning("cannot render %s: %s", row["uri"], e)
            failed += 1
            continue
        path = os.path.join(out, file_name(str(row["image_id"])))
        tmp = f"{path}.tmp.png"
        render_row(row, image).save(tmp)
        os.replace(tmp, path)
        written += 1
    return written, failed
