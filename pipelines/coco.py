"""Results as COCO predictions, and COCO AP/AR of a results table against ground truth.

Images are matched to the ground truth by path (the GT's file_name resolved against the
annotations file's folder), else by a unique file name; categories by label name.

Bounds: the table is read as a stream of record batches (`LakeTable.current`, at most
`batch_rows` rows each) and never whole. `export` holds one batch and its predictions at
a time and writes them straight into the output files. `eval` holds the ground truth (the
user's file, loaded by pycocotools), the predictions of the table rows that are in the
ground truth (so at most what the ground truth's images carry) and one batch; rows
outside the ground truth are counted and dropped while streaming, and the semantic
confusion matrix is accumulated batch by batch.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from models.errors import LakelensError
from pipelines.lake.sources import is_remote, read_bytes

logger = logging.getLogger(__name__)

IOU_TYPES = {"detect": "bbox", "segment": "segm", "pose": "keypoints"}
COLUMNS = {"detect": "detections", "segment": "instances", "pose": "poses"}
STATS = {
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"],
}
STATS["segm"] = STATS["bbox"]
DEFAULT_OKS_SIGMA = 0.07  # per keypoint, when the dataset is not COCO's 17-keypoint person
DEFAULT_BATCH_ROWS = 4096  # table rows per record batch read by eval and export
RESULT_COLUMNS = ["uri", "width", "height", *COLUMNS.values(), "semantic"]


@dataclass
class Tally:
    """What a pass over the table found, besides the predictions themselves."""

    present: set[str] = field(default_factory=set)  # IoU types whose column holds a list in some row
    images: int = 0  # rows turned into predictions (with ground truth: rows found in it)
    image_ids: set[int] = field(default_factory=set)  # the GT images covered (with ground truth only)
    unmatched_images: int = 0
    unknown_labels: Counter = field(default_factory=Counter)


def read_batches(path: str, columns: list[str], *,
                 batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The current result rows (status ok) of DIR's table, locally or at a URI, as record
    batches of at most `batch_rows` rows; the table is never read whole. The table is
    opened now (a missing one raises here); the batches are read as they are consumed."""
    from pipelines.lake.table import open_table

    return _read(open_table(path).current(columns, batch_rows=batch_rows), path)


def _read(batches: Iterator[pa.RecordBatch], path: str) -> Iterator[pa.RecordBatch]:
    try:
        yield from batches
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise LakelensError(f"cannot read results {path!r}: {e}") from e
    finally:
        close = getattr(batches, "close", None)
        if close is not None:  # a generator: stop the scan when the consumer stops early
            close()


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
    root = _gt_root(gt_path)
    if is_remote(gt_path):  # images named relative to the JSON's own prefix
        by_path = {f"{root}/{im['file_name']}": im["id"] for im in gt.dataset["images"]}
    else:
        by_path = {os.path.abspath(os.path.join(root, im["file_name"])): im["id"]
                   for im in gt.dataset["images"]}
    names = Counter(os.path.basename(im["file_name"]) for im in gt.dataset["images"])
    by_name = {os.path.basename(im["file_name"]): im["id"] for im in gt.dataset["images"]
               if names[os.path.basename(im["file_name"])] == 1}
    return by_path, by_name


def _gt_root(gt_path: str) -> str:
    """The folder the GT's file names are relative to."""
    return gt_path.rsplit("/", 1)[0] if is_remote(gt_path) else os.path.dirname(os.path.abspath(gt_path))


def matched(batches: Iterable[pa.RecordBatch], gt: COCO | None, gt_path: str | None,
            tally: Tally) -> Iterator[tuple[pa.RecordBatch, list[int]]]:
    """Each batch's rows that have an image id, with those ids: with ground truth, the rows
    whose image is in it (the others are counted in `tally.unmatched_images` and dropped
    here, before any nested column is read into Python); without, every row, numbered
    1..N in stream order. Records the IoU types present (over all rows) in `tally`."""
    by_path, by_name = _image_lookup(gt, gt_path or "") if gt is not None else ({}, {})
    for batch in batches:
        for task, column in COLUMNS.items():
            if batch.column(column).null_count < batch.num_rows:
                tally.present.add(IOU_TYPES[task])
        if gt is None:
            ids = list(range(tally.images + 1, tally.images + batch.num_rows + 1))
        else:
            found = [i if (i := by_path.get(uri)) is not None else by_name.get(os.path.basename(uri))
                     for uri in batch.column("uri").to_pylist()]
            keep = [i is not None for i in found]
            tally.unmatched_images += keep.count(False)
            if not all(keep):
                batch = batch.filter(pa.array(keep))
                found = [i for i in found if i is not None]
            tally.image_ids.update(found)
            ids = found
        tally.images += len(ids)
        if ids:
            yield batch, ids


def to_coco(batch: pa.RecordBatch, image_ids: list[int], tally: Tally, *,
            categories: dict[str, int] | None = None, kp_category: int = 1) -> dict[str, list[dict]]:
    """COCO predictions (loadRes form) of one batch's rows, by IoU type, for the types
    whose column the batch has. `categories` maps label names to GT category ids (labels
    it lacks are counted in `tally.unknown_labels` and left out); None keeps the models'
    label ids. Poses carry no class: they get `kp_category`."""
    out: dict[str, list[dict]] = {}
    for task in ("detect", "segment"):
        column = batch.column(COLUMNS[task])
        if column.null_count == batch.num_rows:
            continue
        dts = out.setdefault(IOU_TYPES[task], [])
        for image_id, items in zip(image_ids, column.to_pylist(), strict=True):
            for det in items or []:
                cat = categories.get(det["label_name"]) if categories is not None else det["label"]
                if cat is None:
                    tally.unknown_labels[det["label_name"]] += 1
                    continue
                x0, y0, x1, y1 = det["box"]
                p = {"image_id": image_id, "category_id": cat, "score": det["score"],
                     "bbox": [x0, y0, x1 - x0, y1 - y0]}
                if task == "segment":
                    p["segmentation"] = {"size": list(det["mask"]["size"]),
                                         "counts": det["mask"]["counts"]}
                dts.append(p)
    poses = batch.column("poses")
    if poses.null_count < batch.num_rows:
        out["keypoints"] = [{"image_id": image_id, "category_id": kp_category,
                             "keypoints": list(pose["keypoints"]), "score": pose["score"]}
                            for image_id, items in zip(image_ids, poses.to_pylist(), strict=True)
                            for pose in items or []]
    return out


def _gt_categories(gt: COCO) -> tuple[dict[str, int], int]:
    """(label name -> category id, the category poses are scored against)."""
    kp_cats = [c["id"] for c in gt.dataset["categories"] if c.get("keypoints")]
    return {c["name"]: c["id"] for c in gt.dataset["categories"]}, kp_cats[0] if kp_cats else 1


def evaluate(results: str, gt_path: str, *, batch_rows: int = DEFAULT_BATCH_ROWS) -> dict:
    """COCO AP/AR per task present in `results`, over the images the results cover.

    One streaming pass over the table: only the rows whose image is in the ground truth
    become predictions; the semantic confusion matrix is accumulated per batch."""
    gt = load_gt(gt_path)
    categories, kp_category = _gt_categories(gt)
    tally = Tally()
    dts: dict[str, list[dict]] = {t: [] for t in IOU_TYPES.values()}
    semantic = SemanticScore(gt, gt_path)
    for batch, ids in matched(read_batches(results, RESULT_COLUMNS, batch_rows=batch_rows),
                              gt, gt_path, tally):
        for iou_type, found in to_coco(batch, ids, tally, categories=categories,
                                       kp_category=kp_category).items():
            dts[iou_type] += found
        semantic.add(batch, ids)
    if not tally.images:
        raise LakelensError(f"none of the images in {results!r} is in {gt_path!r} (matched by "
                            "path relative to the annotations file, or by file name)")
    report: dict = {"images": tally.images, "unmatched_images": tally.unmatched_images,
                    "unknown_labels": dict(tally.unknown_labels), "tasks": {}}
    image_ids = sorted(tally.image_ids)
    for iou_type in IOU_TYPES.values():
        if iou_type in tally.present:
            report["tasks"][iou_type] = coco_eval(gt, dts.pop(iou_type), iou_type, image_ids)
    scored = semantic.report()
    if scored is not None:
        report["tasks"]["semantic"] = scored
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
    from models.decode import open_image

    record = gt.imgs[image_id]
    if record.get("class_map"):
        name = record["class_map"]
        path = (posixpath.normpath(f"{root}/{name}").replace(":/", "://", 1) if is_remote(root)
                else os.path.normpath(os.path.join(root, name)))
        with open_image(read_bytes(path)) as im:  # the decoder policy, not every plugin
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


class SemanticScore:
    """Mean IoU, pixel accuracy and frequency-weighted IoU of the table's semantic column
    against the ground truth's class maps (classes matched by name; background = 0),
    accumulated batch by batch into one confusion matrix."""

    def __init__(self, gt: COCO, gt_path: str):
        cats = sorted(gt.dataset["categories"], key=lambda c: c["id"])
        self.gt, self.root = gt, _gt_root(gt_path)
        self.names = ["__background__"] + [c["name"] for c in cats]
        self.classes = {c["id"]: n + 1 for n, c in enumerate(cats)}
        self.index = {name: n for n, name in enumerate(self.names)}
        self.conf = np.zeros((len(self.names), len(self.names)), np.int64)
        self.images = self.mismatched = 0
        self.unknown: Counter = Counter()

    def add(self, batch: pa.RecordBatch, image_ids: list[int]) -> None:
        """Score the rows of `batch` (uri, width, height, semantic) that hold a semantic
        result; image_ids: their GT image ids, one per row."""
        from models.masks import rle_to_mask
        from models.semantic import confusion

        if "semantic" not in batch.schema.names:
            return
        has = pc.is_valid(batch.column("semantic"))
        if not pc.any(has).as_py():
            return
        keep = has.to_pylist()
        ids = [i for i, k in zip(image_ids, keep, strict=True) if k]
        rows = batch.select(["width", "height", "semantic"]).filter(has).to_pylist()
        for image_id, row in zip(ids, rows, strict=True):
            truth = gt_class_map(self.gt, image_id, self.root, self.classes)
            if truth.shape != (row["height"], row["width"]):
                self.mismatched += 1  # annotated on other pixels (e.g. before EXIF rotation)
                continue
            pred = np.zeros(truth.shape, np.uint8)
            for seg in row["semantic"]:
                cls = self.index.get(seg["label_name"])
                if cls is None:
                    self.unknown[seg["label_name"]] += int(seg["area"])
                    continue
                pred[rle_to_mask(seg["mask"]) > 0] = cls
            self.conf += confusion(truth, pred, len(self.names))
            self.images += 1

    def report(self) -> dict | None:
        """The metrics, or None when no row held a semantic result of a GT image."""
        from models.semantic import segmentation_metrics

        if not self.images:
            return None
        stats = segmentation_metrics(self.conf, self.names)
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in stats["per_class_iou"].items())
        summary = (f" mean IoU {stats['mean_iou']:.3f}, pixel accuracy {stats['pixel_accuracy']:.3f}, "
                   f"frequency-weighted IoU {stats['fw_iou']:.3f} over {self.images} images\n"
                   f" IoU per class: {per_class}")
        return {"summary": summary, "stats": {k: v for k, v in stats.items() if k != "per_class_iou"},
                "per_class_iou": stats["per_class_iou"], "images": self.images,
                "size_mismatch": self.mismatched, "unknown_label_pixels": dict(self.unknown)}


class JsonArrayFile:
    """A JSON array written item by item (one per line) under a temporary name, then moved
    into place by `commit`: beside the target locally, a local temporary file uploaded in
    one stream for a URI. Holds nothing but the open file."""

    def __init__(self, target: str):
        self.target, self.count = target, 0
        if is_remote(target):
            fd, self.tmp = tempfile.mkstemp(prefix="lakelens-", suffix=".json.tmp")
            os.close(fd)
        else:
            path = os.path.abspath(target.removeprefix("file://"))
            head, tail = os.path.split(path)
            os.makedirs(head, exist_ok=True)
            self.tmp = os.path.join(head, f".{tail}.{uuid.uuid4().hex[:8]}.tmp")
        self.file = open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115 (closed by commit/discard)
        self.file.write("[")

    def add(self, items: Iterable[dict]) -> None:
        for item in items:
            self.file.write(("\n" if not self.count else ",\n") + json.dumps(item, default=str))
            self.count += 1

    def commit(self) -> str:
        """Close the array and move the file to its target; returns the target."""
        try:
            self.file.write("\n]\n" if self.count else "]\n")
            self.file.close()
            if is_remote(self.target):
                fs, path = pafs.FileSystem.from_uri(self.target)
                with open(self.tmp, "rb") as src, fs.open_output_stream(path) as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
            else:
                os.replace(self.tmp, os.path.abspath(self.target.removeprefix("file://")))
        finally:
            self.discard()
        return self.target

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)


def export(results: str, out: str, *, gt_path: str | None = None,
           tasks: tuple[str, ...] | None = None, batch_rows: int = DEFAULT_BATCH_ROWS) -> dict[str, str]:
    """Write COCO predictions (the list pycocotools' loadRes takes): `out` for one IoU type,
    `<out stem>.<type>.json` for several. Returns {iou type: path}.

    One streaming pass over the table: each batch's predictions are appended to a
    temporary file per wanted IoU type, and the files of the types present are moved
    into place at the end (the others are deleted). Without ground truth, image ids are
    1..N in stream order and category ids the models' label ids."""
    gt = load_gt(gt_path) if gt_path else None
    categories, kp_category = _gt_categories(gt) if gt is not None else (None, 1)
    wanted = [IOU_TYPES[t] for t in COLUMNS if tasks is None or t in tasks]
    stem, ext = os.path.splitext(out)
    files = {t: JsonArrayFile(f"{stem}.{t}{ext or '.json'}") for t in wanted}
    tally = Tally()
    try:
        for batch, ids in matched(read_batches(results, RESULT_COLUMNS, batch_rows=batch_rows),
                                  gt, gt_path, tally):
            for iou_type, dts in to_coco(batch, ids, tally, categories=categories,
                                         kp_category=kp_category).items():
                if iou_type in files:
                    files[iou_type].add(dts)
        types = [t for t in wanted if t in tally.present]
        if not types:
            what = "task" if tasks is None else ", ".join(sorted(wanted))
            raise LakelensError(f"{results!r} holds no {what} results")
        paths = {}
        for t in types:
            files[t].target = out if len(types) == 1 else files[t].target
            paths[t] = files.pop(t).commit()
    finally:
        for f in files.values():
            f.discard()
    if tally.unmatched_images:
        logger.warning("%d images are not in the ground truth and were left out",
                       tally.unmatched_images)
    if tally.unknown_labels:
        logger.warning("predictions of labels the ground truth lacks were left out: %s",
                       dict(tally.unknown_labels))
    return paths
