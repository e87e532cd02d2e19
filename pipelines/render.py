"""PNG overlays of results for a person to look at: one panel per task present.

Bounds: the table is streamed in record batches of at most RENDER_BATCH_ROWS rows (fewer
when --limit is smaller) and the stream stops once `limit` images are drawn; one batch
and one image are held at a time.

Each task of a results row is drawn on its own copy of the image (detect | segment | pose |
semantic), side by side in one PNG with the task's name above each panel, so the tasks
do not pile on each other; a row with one task is that one panel, untitled, at the
image's own size. Boxes, masks and skeletons are drawn by torchvision's drawing utilities;
labels ("name score") are placed greedily so that no two overlap.
"""

from __future__ import annotations

import colorsys
import hashlib
import itertools
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from models.decode import decode_image
from models.masks import rle_to_mask
from pipelines.coco import RESULT_COLUMNS, read_batches
from pipelines.lake.sources import read_bytes

logger = logging.getLogger(__name__)

Color = tuple[int, int, int]
Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

# Task name -> results column, in panel order.
TASKS = {"detect": "detections", "segment": "instances", "pose": "poses", "semantic": "semantic"}
# Distinct colours (Trubetskoy's 20): class colours for ids 0..19, instance colours in order.
PALETTE: list[Color] = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]
COCO_SKELETON = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
                 (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4),
                 (3, 5), (4, 6)]  # 0-based pairs of COCO's 17 person keypoints
MAX_SIDE = 1600  # overlays of larger images are drawn reduced
DEFAULT_MIN_SCORE = 0.5  # detections, instances and poses scored below are not drawn
MASK_ALPHA = 0.45  # instance masks
SEMANTIC_ALPHA = 0.5  # the semantic class map
BOX_WIDTH = 2
GAP = 4  # pixels between panels
BACKGROUND: Color = (24, 24, 24)  # around the panels: gaps, titles, legend
TEXT: Color = (240, 240, 240)
PAD = 2  # pixels around label, title and legend text
RENDER_BATCH_ROWS = 256  # table rows per batch: each is decoded and drawn before the next


def skeleton(k: int) -> list[tuple[int, int]]:
    """COCO's person skeleton for 17 keypoints, else a closed loop through them in order."""
    return COCO_SKELETON if k == 17 else [(i, (i + 1) % k) for i in range(k)] if k > 1 else []


def class_color(label: int) -> Color:
    """A stable colour per label id: PALETTE for ids below 20, golden-ratio hues beyond."""
    if 0 <= label < len(PALETTE):
        return PALETTE[label]
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.75, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def check_min_score(min_score: float) -> float:
    """`min_score` when it lies in [0, 1]; ValueError naming it otherwise (NaN included)."""
    if not 0.0 <= min_score <= 1.0:
        raise ValueError(f"min_score must be in [0, 1], got {min_score}")
    return float(min_score)


@dataclass(frozen=True)
class Panel:
    """One task drawn on its own copy of the image.

    pixels: uint8[h, w, 3], the image (as given to `render_row`) with the task drawn.
    legend: (label_name, colour) per class shown, for tasks that colour by class map.
    """

    task: str
    pixels: np.ndarray
    legend: list[tuple[str, Color]] = field(default_factory=list)


def font_for(h: int, w: int, *, bigger: int = 0) -> Font:
    """Pillow's default font at a size that reads at this image size (10..28 px)."""
    return ImageFont.load_default(size=max(10, min(28, round(max(h, w) / 60))) + bigger)


def place_labels(boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]],
                 width: int, height: int) -> list[Rect | None]:
    """Greedy, non-overlapping places for one label per box, inside a width x height image.

    boxes: xyxy in image pixels; sizes: (w, h) of each label. Boxes are served in the
    order given (callers put the most confident first). Each label tries above the box,
    inside its top, below it, inside its bottom (left-aligned, then right-aligned), each
    shifted into the image; the first place that overlaps no label already placed wins.
    Returns a rectangle per box, or None where the label is skipped (no place, or a
    label larger than the image).
    """
    placed: list[Rect] = []
    out: list[Rect | None] = []
    for (x0, y0, x1, y1), (tw, th) in zip(boxes, sizes, strict=True):
        choice = None
        if tw <= width and th <= height:
            lx0, ly0, lx1, ly1 = math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)
            for x in (lx0, lx1 - tw):
                for y in (ly0 - th, ly0, ly1, ly1 - th):
                    cx, cy = min(max(x, 0), width - tw), min(max(y, 0), height - th)
                    rect = (cx, cy, cx + tw, cy + th)
                    if not any(_overlap(rect, other) for other in placed):
                        choice = rect
                        break
                if choice is not None:
                    break
        if choice is not None:
            placed.append(choice)
        out.append(choice)
    return out


def _overlap(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _tensor(image: np.ndarray) -> torch.Tensor:
    """CHW view of an HWC uint8 array (copied when read-only: torch wants writable memory)."""
    return torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)


def _array(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def _mask(rle: dict, h: int, w: int) -> np.ndarray:
    """bool[h, w]: an RLE (any resolution) resampled to the drawn image."""
    mask = rle_to_mask(rle)
    if mask.shape != (h, w):
        mask = np.asarray(Image.fromarray(mask * 255).resize((w, h), Image.Resampling.NEAREST))
    return mask > 0


def _kept(items: list[dict] | None, min_score: float) -> list[dict]:
    """Items scoring at least `min_score`, most confident first."""
    return sorted((d for d in items or [] if d["score"] >= min_score), key=lambda d: -d["score"])


def _scaled_boxes(items: list[dict], sx: float, sy: float) -> list[list[float]]:
    boxes = []
    for d in items:
        x0, y0, x1, y1 = d["box"]
        boxes.append([min(x0, x1) * sx, min(y0, y1) * sy, max(x0, x1) * sx, max(y0, y1) * sy])
    return boxes


def _boxes_and_labels(image: np.ndarray, items: list[dict], colors: list[Color],
                      sx: float, sy: float, default_name: str) -> np.ndarray:
    """Box outlines (torchvision) and one placed "name score" label per box."""
    if not items:
        return image
    h, w = image.shape[:2]
    boxes = _scaled_boxes(items, sx, sy)
    drawn = draw_bounding_boxes(_tensor(image), torch.tensor(boxes, dtype=torch.float32),
                                colors=colors, width=BOX_WIDTH)
    out = Image.fromarray(_array(drawn))
    draw = ImageDraw.Draw(out)
    font = font_for(h, w)
    texts = [f"{d.get('label_name') or default_name} {d['score']:.2f}" for d in items]
    sizes = []
    for text in texts:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        sizes.append((right - left + 2 * PAD, bottom - top + 2 * PAD))
    places = place_labels(boxes, sizes, w, h)
    for text, color, rect in zip(texts, colors, places, strict=True):
        if rect is None:
            continue
        draw.rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), fill=color)
        left, top, _, _ = draw.textbbox((0, 0), text, font=font)
        draw.text((rect[0] + PAD - left, rect[1] + PAD - top), text, font=font, fill=_ink(color))
    skipped = sum(rect is None for rect in places)
    if skipped:
        logger.debug("%d of %d labels skipped: no free place", skipped, len(places))
    return np.asarray(out)


def _ink(background: Color) -> Color:
    """Black or white text, whichever reads on `background`."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_detect(image: np.ndarray, detections: list[dict], sx: float, sy: float) -> np.ndarray:
    """Boxes coloured by class, with labels. detections: already filtered and ordered."""
    return _boxes_and_labels(image, detections, [class_color(d["label"]) for d in detections],
                             sx, sy, "object")


def draw_segment(image: np.ndarray, instances: list[dict], sx: float, sy: float) -> np.ndarray:
    """Each instance's mask tinted in its own colour, then its box and label.

    Masks are blended one at a time inside their bounding rectangle, so overlapping
    instances blend in turn and no pixel outside every mask changes.
    """
    h, w = image.shape[:2]
    out = image.copy()
    colors = [PALETTE[n % len(PALETTE)] for n in range(len(instances))]
    for inst, color in zip(instances, colors, strict=True):
        mask = _mask(inst["mask"], h, w)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not len(rows):
            continue
        ys, xs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        crop, crop_mask = out[ys, xs], mask[ys, xs]
        tinted = _array(draw_segmentation_masks(_tensor(crop), torch.from_numpy(crop_mask),
                                                alpha=MASK_ALPHA, colors=color))
        crop[crop_mask] = tinted[crop_mask]
    return _boxes_and_labels(out, instances, colors, sx, sy, "object")


def draw_pose(image: np.ndarray, poses: list[dict], sx: float, sy: float) -> np.ndarray:
    """Each pose's visible keypoints (v > 0) and skeleton, then its box and score."""
    h, w = image.shape[:2]
    colors = [PALETTE[n % len(PALETTE)] for n in range(len(poses))]
    drawn = _tensor(image)
    radius = max(2, round(max(h, w) / 250))
    for pose, color in zip(poses, colors, strict=True):
        kp = np.asarray(pose["keypoints"], np.float32).reshape(-1, 3)
        if not len(kp):
            continue
        xy = torch.from_numpy(kp[:, :2] * np.array([sx, sy], np.float32))[None]
        visible = torch.from_numpy(kp[:, 2] > 0)[None]
        drawn = draw_keypoints(drawn, xy, connectivity=skeleton(len(kp)), colors=color,
                               radius=radius, width=max(1, radius - 1), visibility=visible)
    return _boxes_and_labels(_array(drawn), poses, colors, sx, sy, "pose")


def draw_semantic(image: np.ndarray, classes: list[dict]) -> tuple[np.ndarray, list[tuple[str, Color]]]:
    """The class map tinted with each class's colour; returns it and the legend
    (label_name, colour) of the classes present, largest first. Classes are disjoint
    in the table; should two overlap, the larger one is drawn there."""
    h, w = image.shape[:2]
    classes = sorted(classes, key=lambda c: -int(c.get("area") or 0))
    masks, colors, legend = [], [], []
    taken = np.zeros((h, w), bool)
    for c in reversed(classes):  # the largest class is drawn last: it keeps contested pixels
        mask = _mask(c["mask"], h, w) & ~taken
        taken |= mask
        if mask.any():
            masks.append(mask)
            colors.append(class_color(int(c["label"])))
    for c in classes:
        legend.append((c.get("label_name") or str(c["label"]), class_color(int(c["label"]))))
    if not masks:
        return image.copy(), legend
    tinted = _array(draw_segmentation_masks(_tensor(image), torch.from_numpy(np.stack(masks)),
                                            alpha=SEMANTIC_ALPHA, colors=colors))
    out = image.copy()
    out[taken] = tinted[taken]
    return out, legend


def tasks_present(row: dict) -> list[str]:
    """The tasks whose column holds a list in this row (empty lists count: nothing found)."""
    return [task for task, column in TASKS.items() if row.get(column) is not None]


def draw_panels(row: dict, image: np.ndarray, *, min_score: float = DEFAULT_MIN_SCORE) -> list[Panel]:
    """One Panel per task present in `row`, drawn over `image` (uint8[h, w, 3], upright,
    any scale: the row's boxes, in original pixels, are scaled by image size / row size).
    Detections, instances and poses scoring below `min_score` are left out."""
    check_min_score(min_score)
    h, w = image.shape[:2]
    sx, sy = w / row["width"], h / row["height"]
    panels = []
    for task in tasks_present(row):
        items = row[TASKS[task]]
        if task == "detect":
            panels.append(Panel(task, draw_detect(image, _kept(items, min_score), sx, sy)))
        elif task == "segment":
            panels.append(Panel(task, draw_segment(image, _kept(items, min_score), sx, sy)))
        elif task == "pose":
            panels.append(Panel(task, draw_pose(image, _kept(items, min_score), sx, sy)))
        else:
            pixels, legend = draw_semantic(image, items)
            panels.append(Panel(task, pixels, legend))
    return panels


def _text_height(font: Font) -> tuple[int, int]:
    """(height, top offset) of a line of text in `font`: drawn at (x, y - top), its glyphs
    span y..y + height."""
    _, top, _, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Ag", font=font)
    return bottom - top, top


def _legend_rows(legend: list[tuple[str, Color]], width: int, font: Font
                 ) -> list[list[tuple[int, str, Color]]]:
    """Legend entries wrapped into rows of (x offset, name, colour) within `width`."""
    swatch, _ = _text_height(font)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows: list[list[tuple[int, str, Color]]] = []
    x = PAD
    for name, color in legend:
        entry = swatch + PAD + math.ceil(probe.textlength(name, font=font)) + 3 * PAD
        if not rows or x + entry > width:
            rows.append([])
            x = PAD
        rows[-1].append((x, name, color))
        x += entry
    return rows


def compose(panels: list[Panel], image: np.ndarray) -> Image.Image:
    """Panels side by side, GAP apart, each titled with its task when there are several,
    legends below; one untitled panel keeps the image's size (plus its legend, if any);
    no panel at all is the image itself."""
    if not panels:
        return Image.fromarray(image)
    h, w = image.shape[:2]
    font, title_font = font_for(h, w), font_for(h, w, bigger=2)
    line, line_top = _text_height(font)
    title_line, title_top = _text_height(title_font)
    title_h = title_line + 2 * PAD if len(panels) > 1 else 0
    legends = [_legend_rows(p.legend, w, font) for p in panels]
    row_h = line + 2 * PAD
    legend_rows = max(len(rows) for rows in legends)
    legend_h = legend_rows * row_h + 2 * PAD if legend_rows else 0
    canvas = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * GAP, title_h + h + legend_h),
                       BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for n, (panel, rows) in enumerate(zip(panels, legends, strict=True)):
        x0 = n * (w + GAP)
        canvas.paste(Image.fromarray(panel.pixels), (x0, title_h))
        if title_h:
            draw.text((x0 + PAD, PAD - title_top), panel.task, font=title_font, fill=TEXT)
        for r, entries in enumerate(rows):
            y = title_h + h + 2 * PAD + r * row_h
            for x, name, color in entries:
                draw.rectangle((x0 + x, y, x0 + x + line - 1, y + line - 1), fill=color)
                draw.text((x0 + x + line + PAD, y - line_top), name, font=font, fill=TEXT)
    return canvas


def render_row(row: dict, image: np.ndarray, *, min_score: float = DEFAULT_MIN_SCORE) -> Image.Image:
    """Draw one results row over its upright image (uint8[h, w, 3], any scale): a panel
    per task present (detections, instances, poses, semantic), side by side."""
    return compose(draw_panels(row, image, min_score=min_score), image)


SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def file_name(image_id: str) -> str:
    """OUT/<image_id>.png, or a hash of the id when it is not a plain file name: a table's
    ids never steer a write outside --out (`../x`, `/etc/x`, NUL, separators)."""
    if SAFE_NAME.fullmatch(image_id):
        return f"{image_id}.png"
    return f"id-{hashlib.sha256(image_id.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}.png"


def render(results: str, out: str, *, limit: int | None = None,
           min_score: float = DEFAULT_MIN_SCORE, batch_rows: int = RENDER_BATCH_ROWS) -> tuple[int, int]:
    """Write OUT/<image_id>.png for the first `limit` rows; returns (written, unreadable).

    Detections, instances and poses scoring below `min_score` (in [0, 1]) are not drawn.
    The rows are streamed `batch_rows` at a time and the stream stops at `limit`.
    """
    check_min_score(min_score)
    if limit is not None:
        batch_rows = max(1, min(batch_rows, limit))
    batches = read_batches(results, [*RESULT_COLUMNS, "image_id"], batch_rows=batch_rows)
    os.makedirs(out, exist_ok=True)
    written = failed = 0
    rows = (row for batch in batches for row in batch.to_pylist())
    try:
        for row in itertools.islice(rows, limit):
            try:
                image = decode_image(read_bytes(row["uri"]), long=MAX_SIDE).pixels
            except (OSError, ValueError) as e:
                logger.warning("cannot render %s: %s", row["uri"], e)
                failed += 1
                continue
            path = os.path.join(out, file_name(str(row["image_id"])))
            tmp = f"{path}.tmp.png"
            render_row(row, image, min_score=min_score).save(tmp)
            os.replace(tmp, path)
            written += 1
    finally:
        rows.close()  # stops the table scan when `limit` ends the loop early
        batches.close()
    return written, failed
