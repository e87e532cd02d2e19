"""COCO export and evaluation against hand-made cases with known answers (real pycocotools)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from models.errors import LakelensError
from pipelines.coco import evaluate, export
from pipelines.synth import CATEGORIES, write_lake
from tests.helpers import commit_rows
from tests.test_cli import _one_line_error, lakelens


def _rows_from_gt(gt_path: Path, shift: float = 0.0) -> list[dict]:
    """A results row per GT image whose predictions are the GT objects (boxes moved
    right by `shift` times their width)."""
    coco = json.loads(gt_path.read_text())
    rows = []
    for im in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        dets, insts, poses = [], [], []
        for a in anns:
            x, y, w, h = a["bbox"]
            box = [x + shift * w, y, x + shift * w + w, y + h]
            det = {"box": box, "label": a["category_id"], "score": 0.9,
                   "label_name": CATEGORIES[a["category_id"] - 1]}
            dets.append(det)
            insts.append({**det, "mask": a["segmentation"]})
            poses.append({"box": box, "score": 0.9, "keypoints": a["keypoints"]})
        rows.append({"image_id": f"id{im['id']}", "uri": str(gt_path.parent / im["file_name"]),
                     "content_hash": "x", "width": im["width"], "height": im["height"],
                     "detections": dets, "instances": insts, "poses": poses, "embedding": None,
                     "models": [], "run_id": "r", "annotated_at": datetime.now(UTC)})
    return rows


def _write(directory: Path, rows: list[dict]) -> Path:
    return commit_rows(directory, rows)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lake(tmp_path_factory.mktemp("coco") / "lake", images=4, seed=2)


def test_perfect_predictions_score_one(lake: Path, tmp_path: Path) -> None:
    report = evaluate(str(_write(tmp_path, _rows_from_gt(lake))), str(lake))
    assert report["images"] == 4 and report["unmatched_images"] == 0
    for iou_type in ("bbox", "segm", "keypoints"):
        stats = report["tasks"][iou_type]["stats"]
        assert stats["AP"] == pytest.approx(1.0), (iou_type, stats)
        assert stats["AP50"] == pytest.approx(1.0)


def test_boxes_off_by_a_quarter_pass_iou_50_and_fail_iou_75(lake: Path, tmp_path: Path) -> None:
    # Shifting a box by a quarter of its width gives IoU = 0.75 / 1.25 = 0.6.
    report = evaluate(str(_write(tmp_path, _rows_from_gt(lake, shift=0.25))), str(lake))
    bbox = report["tasks"]["bbox"]["stats"]
    assert bbox["AP50"] == pytest.approx(1.0) and bbox["AP75"] == pytest.approx(0.0)
    assert "Average Precision" in report["tasks"]["bbox"]["summary"]


def test_export_loads_in_pycocotools(lake: Path, tmp_path: Path) -> None:
    results = _write(tmp_path / "res", _rows_from_gt(lake))
    paths = export(str(results), str(tmp_path / "preds.json"), gt_path=str(lake))
    assert set(paths) == {"bbox", "segm", "keypoints"}
    gt = COCO(str(lake))
    for iou_type, path in paths.items():
        dt = gt.loadRes(path)
        assert len(dt.getAnnIds()) == len(gt.getAnnIds()), iou_type
        assert set(dt.getImgIds()) == set(gt.getImgIds())
    only = export(str(results), str(tmp_path / "boxes.json"), tasks=("detect",))
    boxes = json.loads(Path(only["bbox"]).read_text())
    assert only == {"bbox": str(tmp_path / "boxes.json")}
    assert {b["image_id"] for b in boxes} == {1, 2, 3, 4}  # no GT: numbered in row order


def test_eval_and_export_commands(lake: Path, tmp_path: Path) -> None:
    results = _write(tmp_path / "res", _rows_from_gt(lake))
    proc = lakelens("eval", str(results), "--gt", str(lake))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bbox:" in proc.stdout and "4 images evaluated" in proc.stdout
    saved = json.loads((results / "eval.json").read_text())
    assert saved["tasks"]["segm"]["stats"]["AP"] == pytest.approx(1.0)
    _one_line_error(lakelens("eval", str(results), "--gt", str(tmp_path / "none.json")),
                    "cannot read ground truth")
    _one_line_error(lakelens("export", "coco", str(results), "--out", str(tmp_path / "p.json"),
                             "--tasks", "embed"), "has no COCO form")


def test_results_outside_the_ground_truth_are_an_error(lake: Path, tmp_path: Path) -> None:
    rows = _rows_from_gt(lake)
    for row in rows:
        row["uri"] = "/elsewhere/" + row["uri"].replace("/", "_")
    with pytest.raises(LakelensError, match="none of the images"):
        evaluate(str(_write(tmp_path, rows)), str(lake))


def test_render_draws_masks_boxes_and_skeletons_on_the_image(lake: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from models.masks import rle_to_mask
    from pipelines.render import GAP, render

    rows = _rows_from_gt(lake)
    results = _write(tmp_path / "res", rows)
    written, failed = render(str(results), str(tmp_path / "png"), limit=3)
    assert (written, failed) == (3, 0)
    row = rows[0]
    png = np.asarray(Image.open(tmp_path / "png" / f"{row['image_id']}.png").convert("RGB"))
    original = np.asarray(Image.open(row["uri"]).convert("RGB"))
    h, w = original.shape[:2]
    assert png.shape[1] == 3 * w + 2 * GAP and png.shape[0] > h  # detect | segment | pose, titled
    top = png.shape[0] - h
    panels = [png[top:, n * (w + GAP):n * (w + GAP) + w] for n in range(3)]
    changed = [np.abs(p.astype(int) - original.astype(int)).sum(axis=2) > 0 for p in panels]
    mask = rle_to_mask(row["instances"][0]["mask"]).astype(bool)
    assert changed[1][mask].mean() > 0.9  # the segment panel tints the mask
    assert changed[0][mask].mean() < 0.5  # the detect panel draws no mask
    far = np.ones_like(mask)
    for inst in row["instances"]:
        x0, y0, x1, y1 = (int(v) for v in inst["box"])
        far[max(0, y0 - 20):y1 + 20, max(0, x0 - 70):x1 + 70] = False  # boxes and their labels
    for panel_changed in changed:
        assert panel_changed[far].mean() < 0.02  # the background is left alone
    for panel_changed in changed:
        assert panel_changed.any()  # each panel draws its task

    assert render(str(results), str(tmp_path / "high"), limit=3, min_score=0.95) == (3, 0)
    png = np.asarray(Image.open(tmp_path / "high" / f"{row['image_id']}.png").convert("RGB"))
    for n in range(3):  # every score is 0.9: nothing is drawn
        assert (png[top:, n * (w + GAP):n * (w + GAP) + w] == original).all()
