"""Results as COCO predictions, and COCO AP/AR of a results table against ground truth.

Images are matched to the ground truth by path (the GT's file_name resolved against the
annotations file's folder), else by a unique file name; categories by label name.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from models.errors import LakelensError
from pipelines.lake.sources import is_remote, read_bytes
from pipelines.lake.table import save_json

logger = logging.getLogger(__name__)

IOU_TYPES = {"detect": "bbox", "segment": "segm", "pose": "keypoints"}
COLUMNS = {"detect": "detections", "segment": "instances", "pose": "poses"}
STATS = {
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"],
}
STATS["segm"] = STATS["bbox"]
DEFAULT_OKS_SIGMA = 0.07  # per keypoint, when the dataset is not COCO's 17-keypoint person


@dataclass
class Predictions:
    """COCO-format predictions per IoU type, and what could not be placed."""

    by_type: dict[str, list[dict]] = field(default_factory=dict)
    image_ids: list[int] = field(default_factory=list)  # the images the results cover
    unmatched_images: int = 0
    unknown_labels: Counter = field(default_factory=Counter)


def read_results(path: str, extra: list[str] | None = None, *,
                 limit: int | None = None) -> pa.Table:
    """The current result rows (status ok) of DIR's table, locally or at a URI."""
    from pipelines.lake.table import open_table

    columns = ["uri", "width", "height", *COLUMNS.values(), "semantic", *(extra or [])]
    table = open_table(path)
    try:
        if limit is None:
            return table.current_table(columns)
        batches, n = [], 0
        for batch in table.current(columns):
            batches.append(batch)
            n += batch.num_rows
            if n >= limit:
                break
        return pa.Table.from_batches(batches, schema=batches[0].schema).slice(0, limit) if batches \
            else table.current_table(columns)
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise LakelensError(f"cannot read results {path!r}: {e}") from e


def load_gt(path: str) -> COCO:
    """Ground truth from a local file or a URI (s3://...)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            if not is_remote(path):
                return COCO(path)
            coco = COCO()
            coco.dataset = json.loads(read_bytes(path))
            coco.createIndex()
            return coco
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LakelensError(f"cannot read ground truth {path!r} as COCO JSON: {e}") from e


def _image_lookup(gt: COCO, gt_path: str) -> tuple[dict[str, int], dict[str, int]]:
    if is_remote(gt_path):  # images named relative to the JSON's own prefix
        root = gt_path.rsplit("/", 1)[0]
        by_path = {f"{root}/{im['file_name']}": im["id"] for im in gt.dataset["images"]}
    else:
        root = os.path.dirname(os.path.abspath(gt_path))
        by_path = {os.path.abspath(os.path.join(root, im["file_name"])): im["id"]
                   for im in gt.dataset["images"]}
    names = Counter(os.path.basename(im["file_name"]) for im in gt.dataset["images"])
    by_name = {os.path.basename(im["file_name"]): im["id"] for im in gt.dataset["images"]
               if names[os.path.basename(im["file_name"])] == 1}
    return by_path, by_name


def to_predictions(table: pa.Table, gt: COCO | None = None, gt_path: str | None = None) -> Predictions:
    """COCO predictions of every task present. With ground truth, image and category ids
    are the GT's; without, images are numbered 1..N in row order and categories are the
    models' label ids."""
    preds = Predictions({IOU_TYPES[t]: [] for t, c in COLUMNS.items()
                         if table.column(c).null_count < table.num_rows})
    by_path, by_name = _image_lookup(gt, gt_path or "") if gt else ({}, {})
    categories = {c["name"]: c["id"] for c in gt.dataset["categories"]} if gt else {}
    kp_cats = [c["id"] for c in gt.dataset["categories"] if c.get("keypoints")] if gt else [1]
    for n, row in enumerate(table.to_pylist()):
        if gt is None:
            image_id = n + 1
        else:
            image_id = by_path.get(row["uri"]) or by_name.get(os.path.basename(row["uri"]))
            if image_id is None:
                preds.unmatched_images += 1
                continue
        preds.image_ids.append(image_id)
        for task in ("detect", "segment"):
            for det in row[COLUMNS[task]] or []:
                cat = categories.get(det["label_name"]) if gt else det["label"]
                if cat is None:
                    preds.unknown_labels[det["label_name"]] += 1
                    continue
                x0, y0, x1, y1 = det["box"]
                p = {"image_id": image_id, "category_id": cat, "score": det["score"],
                     "bbox": [x0, y0, x1 - x0, y1 - y0]}
                if task == "segment":
                    p["segmentation"] = {"size": list(det["mask"]["size"]),
                                         "counts": det["mask"]["counts"]}
                preds.by_type[IOU_TYPES[task]].append(p)
        for pose in row["poses"] or []:
            preds.by_type["keypoints"].append({
                "image_id": image_id, "category_id": kp_cats[0] if kp_cats else 1,
                "keypoints": list(pose["keypoints"]), "score": pose["score"]})
    return preds


def evaluate(results: str, gt_path: str) -> dict:
    """COCO AP/AR per task present in `results`, over the images the results cover."""
    gt = load_gt(gt_path)
    table = read_results(results)
    preds = to_predictions(table, gt, gt_path)
    if not preds.image_ids:
        raise LakelensError(f"none of the images in {results!r} is in {gt_path!r} (matched by "
                            "path relative to the annotations file, or by file name)")
    report: dict = {"images": len(preds.image_ids), "unmatched_images": preds.unmatched_images,
                    "unknown_labels": dict(preds.unknown_labels), "tasks": {}}
    for iou_type, dts in preds.by_type.items():
        report["tasks"][iou_type] = coco_eval(gt, dts, iou_type, sorted(set(preds.image_ids)))
    semantic = semantic_report(table, gt, gt_path)
    if semantic is not None:
        report["tasks"]["semantic"] = semantic
    return report


def coco_eval(gt: COCO, dts: list[dict], iou_type: str, image_ids: list[int]) -> dict:
    """COCOeval of loadRes-ready predictions over `image_ids`: {"stats": {name: value},
    "summary": the printed table}. Keypoints are evaluated class-agnostic."""
    names = STATS[iou_type]
    if not dts:
        return {"stats": dict.fromkeys(names, 0.0), "summary": "no predictions"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if iou_type == "keypoints":
            gt = _one_keypoint_category(gt)
            kp_cats = [c["id"] for c in gt.dataset["categories"] if c.get("keypoints")]
            if kp_cats:  # poses carry no class: score them against the merged category
                dts = [d | {"category_id": kp_cats[0]} for d in dts]
        dt = gt.loadRes(dts)
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = image_ids
        if iou_type == "keypoints":
            k = len(dts[0]["keypoints"]) // 3
            if k != len(ev.params.kpt_oks_sigmas):
                ev.params.kpt_oks_sigmas = np.full(k, DEFAULT_OKS_SIGMA)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    summary = "\n".join(line for line in out.getvalue().splitlines() if "Average" in line)
    return {"stats": {n: float(v) for n, v in zip(names, ev.stats, strict=True)},
            "summary": summary}


def _one_keypoint_category(gt: COCO) -> COCO:
    """Poses carry no class, so keypoints are evaluated class-agnostic: every category with
    keypoints becomes the first one (pycocotools' useCats=0 does not work for keypoints)."""
    kp_cats = [c for c in gt.dataset["categories"] if c.get("keypoints")]
    if len(kp_cats) <= 1:
        return gt
    first, ids = kp_cats[0]["id"], {c["id"] for c in kp_cats}
    merged = COCO()
    merged.dataset = {
        **gt.dataset, "categories": [kp_cats[0]],
        "annotations": [{**a, "category_id": first} for a in gt.dataset["annotations"]
                        if a["category_id"] in ids]}
    merged.createIndex()
    return merged


IGNORE = 255  # class-map value of pixels that are not scored (crowd regions)


def gt_class_map(gt: COCO, image_id: int, root: str, classes: dict[int, int]) -> np.ndarray:
    """The ground truth's per-pixel classes of one image, uint8[h, w]: 0 background,
    `classes[category_id]` for a category, IGNORE for crowd regions and unknown ids.

    From the image's own label PNG when its record names one (``class_map``, pixel values
    = category ids, relative to `root` like file_name), else painted from its instance
    masks (larger first, so a smaller object on top stays visible)."""
    from PIL import Image

    record = gt.imgs[image_id]
    if record.get("class_map"):
        name = record["class_map"]
        path = (posixpath.normpath(f"{root}/{name}").replace(":/", "://", 1) if is_remote(root)
                else os.path.normpath(os.path.join(root, name)))
        with Image.open(io.BytesIO(read_bytes(path))) as im:
            ids = np.asarray(im)
        lut = np.full(256, IGNORE, np.uint8)
        lut[0] = 0
        for cat, cls in classes.items():
            if 0 < cat < 256:
                lut[cat] = cls
        return lut[ids]
    out = np.zeros((record["height"], record["width"]), np.uint8)
    anns = sorted(gt.imgToAnns.get(image_id, []), key=lambda a: -a.get("area", 0))
    for ann in anns:
        if not ann.get("segmentation"):
            continue
        m = gt.annToMask(ann).astype(bool)
        out[m] = IGNORE if ann.get("iscrowd") else classes.get(ann["category_id"], IGNORE)
    return out


def semantic_report(table: pa.Table, gt: COCO, gt_path: str) -> dict | None:
    """Mean IoU, pixel accuracy and frequency-weighted IoU of the table's semantic column
    against the ground truth's class maps (classes matched by name; background = 0)."""
    from models.masks import rle_to_mask
    from models.semantic import confusion, segmentation_metrics

    if "semantic" not in table.column_names or table.column("semantic").null_count == table.num_rows:
        return None
    cats = sorted(gt.dataset["categories"], key=lambda c: c["id"])
    names = ["__background__"] + [c["name"] for c in cats]
    classes = {c["id"]: n + 1 for n, c in enumerate(cats)}
    index = {name: n for n, name in enumerate(names)}
    by_path, by_name = _image_lookup(gt, gt_path)
    root = gt_path.rsplit("/", 1)[0] if is_remote(gt_path) else os.path.dirname(os.path.abspath(gt_path))
    conf = np.zeros((len(names), len(names)), np.int64)
    images, unknown, mismatched = 0, Counter(), 0
    for row in table.select(["uri", "width", "height", "semantic"]).to_pylist():
        if row["semantic"] is None:
            continue
        image_id = by_path.get(row["uri"]) or by_name.get(os.path.basename(row["uri"]))
        if image_id is None:
            continue
        truth = gt_class_map(gt, image_id, root, classes)
        if truth.shape != (row["height"], row["width"]):
            mismatched += 1  # annotated on other pixels (e.g. before EXIF rotation)
            continue
        pred = np.zeros(truth.shape, np.uint8)
        for seg in row["semantic"]:
            cls = index.get(seg["label_name"])
            if cls is None:
                unknown[seg["label_name"]] += int(seg["area"])
                continue
            pred[rle_to_mask(seg["mask"]) > 0] = cls
        conf += confusion(truth, pred, len(names))
        images += 1
    if not images:
        return None
    stats = segmentation_metrics(conf, names)
    per_class = ", ".join(f"{k} {v:.3f}" for k, v in stats["per_class_iou"].items())
    summary = (f" mean IoU {stats['mean_iou']:.3f}, pixel accuracy {stats['pixel_accuracy']:.3f}, "
               f"frequency-weighted IoU {stats['fw_iou']:.3f} over {images} images\n"
               f" IoU per class: {per_class}")
    return {"summary": summary, "stats": {k: v for k, v in stats.items() if k != "per_class_iou"},
            "per_class_iou": stats["per_class_iou"], "images": images,
            "size_mismatch": mismatched, "unknown_label_pixels": dict(unknown)}


def export(results: str, out: str, *, gt_path: str | None = None,
           tasks: tuple[str, ...] | None = None) -> dict[str, str]:
    """Write COCO predictions (the list pycocotools' loadRes takes): `out` for one IoU type,
    `<out stem>.<type>.json` for several. Returns {iou type: path}."""
    gt = load_gt(gt_path) if gt_path else None
    preds = to_predictions(read_results(results), gt, gt_path)
    wanted = {IOU_TYPES[t] for t in tasks} if tasks else set(preds.by_type)
    types = [t for t in preds.by_type if t in wanted]
    if not types:
        raise LakelensError(f"{results!r} holds no {', '.join(sorted(wanted)) or 'task'} results")
    stem, ext = os.path.splitext(out)
    paths = {t: out if len(types) == 1 else f"{stem}.{t}{ext or '.json'}" for t in types}
    for t, path in paths.items():
        save_json(path, preds.by_type[t], indent=None)
    if preds.unmatched_images:
        logger.warning("%d images are not in the ground truth and were left out",
                       preds.unmatched_images)
    return paths
