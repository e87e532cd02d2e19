"""render: a panel per task, checked pixel by pixel on synthetic images and hand-built rows
(real pycocotools RLE)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipelines.render import (
    GAP,
    MASK_ALPHA,
    PALETTE,
    SEMANTIC_ALPHA,
    class_color,
    draw_panels,
    place_labels,
    render,
    render_row,
    tasks_present,
)
from tests.test_cli import _one_line_error, lakelens

H, W = 120, 160  # the drawn image; rows describe it at twice that size


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, (H, W, 3), dtype=np.uint8)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _rect_mask(y0: int, y1: int, x0: int, x1: int, h: int = 2 * H, w: int = 2 * W) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _row(**columns: list[dict] | None) -> dict:
    return {"width": 2 * W, "height": 2 * H, **columns}


def _blend(pixels: np.ndarray, color: tuple[int, int, int], alpha: float) -> np.ndarray:
    return pixels.astype(np.float64) * (1 - alpha) + np.array(color, np.float64) * alpha


def _det(box: list[float], score: float = 0.9, label: int = 1, name: str = "person") -> dict:
    return {"box": box, "label": label, "label_name": name, "score": score}


def test_box_outline_is_drawn_at_the_scaled_box() -> None:
    image = _image()
    (panel,) = draw_panels(_row(detections=[_det([40, 20, 200, 120], label=3)]), image)
    px, color = panel.pixels, class_color(3)
    # the box is [20, 10, 100, 60] in the drawn image; the outline is 2 px, inward
    for y, x in [(35, 20), (35, 21), (35, 99), (35, 100), (59, 50), (60, 50), (10, 97), (11, 97)]:
        assert tuple(px[y, x]) == color, (y, x)
    for y, x in [(35, 19), (35, 22), (35, 98), (35, 101), (58, 50), (61, 50), (35, 50)]:
        assert (px[y, x] == image[y, x]).all(), (y, x)  # just outside and inside: untouched


def test_instance_mask_is_tinted_inside_and_the_background_untouched() -> None:
    image = _image(1)
    inst = {**_det([60, 40, 180, 120]), "mask": _rle(_rect_mask(40, 120, 60, 180))}
    (panel,) = draw_panels(_row(instances=[inst]), image)
    px = panel.pixels.astype(int)
    inside = np.zeros((H, W), bool)
    inside[23:58, 33:88] = True  # the mask [20:60, 30:90] less the 2 px box outline
    expected = _blend(image, PALETTE[0], MASK_ALPHA)
    assert np.abs(px[inside] - expected[inside]).max() <= 1  # the tint, and only the tint
    touched = np.zeros((H, W), bool)
    touched[20:61, 30:91] = True  # mask and outline (the box's far edges: row 60, column 90)
    touched[:20, 30:120] = True  # the label, above the box
    assert (panel.pixels[~touched] == image[~touched]).all()  # exactly the source pixels
    assert (panel.pixels[:20, 30:120] != image[:20, 30:120]).any()  # a label was drawn


def test_overlapping_instances_blend_in_turn_and_nothing_else_changes() -> None:
    image = _image(2)
    a = {**_det([20, 20, 100, 100]), "mask": _rect_mask(20, 100, 20, 100)}
    b = {**_det([60, 60, 140, 140], 0.8), "mask": _rect_mask(60, 100, 60, 140)}
    rows = [{**a, "mask": _rle(a["mask"])}, {**b, "mask": _rle(b["mask"])}]
    (panel,) = draw_panels(_row(instances=rows), image)
    both = (slice(40, 49), slice(40, 49))  # inside both masks, away from outlines
    expected = _blend(_blend(image[both], PALETTE[0], MASK_ALPHA).astype(np.uint8), PALETTE[1],
                      MASK_ALPHA)
    assert np.abs(panel.pixels[both].astype(int) - expected).max() <= 1


def test_scores_below_min_score_leave_the_panel_identical_to_the_image() -> None:
    image = _image(3)
    low = _det([40, 20, 200, 120], score=0.3)
    kp = [v for i in range(17) for v in (50.0 + 4 * i, 30.0 + 4 * i, 2.0)]
    row = _row(detections=[low], instances=[{**low, "mask": _rle(_rect_mask(20, 120, 40, 200))}],
               poses=[{"box": low["box"], "score": 0.3, "keypoints": kp}])
    panels = draw_panels(row, image, min_score=0.5)
    assert [p.task for p in panels] == ["detect", "segment", "pose"]
    for panel in panels:
        assert (panel.pixels == image).all(), panel.task
    for panel in draw_panels(row, image, min_score=0.3):  # at the threshold: drawn
        assert (panel.pixels != image).any(), panel.task
    with pytest.raises(ValueError, match=r"min_score must be in \[0, 1\], got 1.5"):
        draw_panels(row, image, min_score=1.5)


def test_keypoints_are_drawn_where_visible_and_scaled() -> None:
    image = _image(4)
    kp = [100.0, 60.0, 2.0, 240.0, 180.0, 0.0, 140.0, 100.0, 1.0]  # the middle one is not visible
    (panel,) = draw_panels(_row(poses=[{"box": [90, 50, 150, 110], "score": 0.9, "keypoints": kp}]),
                           image)
    # the points at (50, 30) and (70, 50), radius 2, beside the skeleton line joining them
    assert tuple(panel.pixels[31, 49]) == PALETTE[0] and tuple(panel.pixels[51, 69]) == PALETTE[0]
    assert (panel.pixels[85:96, 115:126] == image[85:96, 115:126]).all()  # (120, 90) not drawn


def test_labels_of_overlapping_boxes_do_not_overlap() -> None:
    boxes = [[20, 20, 80, 60], [22, 22, 82, 62], [24, 18, 78, 58], [20, 20, 80, 60]]
    sizes = [(50, 12)] * len(boxes)
    rects = place_labels(boxes, sizes, W, H)
    assert len(rects) == len(boxes)
    placed = [r for r in rects if r is not None]
    assert len(placed) >= 3  # above, inside and below the pile
    for n, a in enumerate(placed):
        assert 0 <= a[0] and 0 <= a[1] and a[2] <= W and a[3] <= H
        assert (a[2] - a[0], a[3] - a[1]) == (50, 12)
        for b in placed[n + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    assert rects[0] == (20, 8, 70, 20)  # the first box's label sits just above it


def test_a_label_with_no_free_place_is_skipped_and_one_too_big_never_drawn() -> None:
    rects = place_labels([[0, 0, 40, 30]] * 12, [(40, 15)] * 12, 40, 30)
    placed = [r for r in rects if r is not None]
    assert len(placed) == 2 and rects[2:] == [None] * 10  # the image holds two such labels
    assert place_labels([[0, 0, 10, 10]], [(W + 1, 10)], W, H) == [None]


def test_semantic_tints_exactly_the_class_pixels_and_its_legend_shows_each_class() -> None:
    image = _image(5)
    sky, road = _rect_mask(0, 60, 0, 2 * W), _rect_mask(160, 240, 40, 300)
    classes = [{"label": 12, "label_name": "sky", "mask": _rle(sky), "area": int(sky.sum()),
                "mean_score": 0.9},
               {"label": 27, "label_name": "road", "mask": _rle(road), "area": int(road.sum()),
                "mean_score": 0.7}]
    row = _row(semantic=classes)
    (panel,) = draw_panels(row, image)
    assert panel.task == "semantic"
    assert panel.legend == [("road", class_color(27)), ("sky", class_color(12))]  # largest first
    assert class_color(12) != class_color(27) and class_color(27) == class_color(27)
    px = panel.pixels.astype(int)
    masks = {12: _rect_mask(0, 30, 0, W, H, W), 27: _rect_mask(80, 120, 20, 150, H, W)}
    for label, mask in masks.items():
        assert np.abs(px[mask] - _blend(image, class_color(label), SEMANTIC_ALPHA)[mask]).max() <= 1
    other = ~(masks[12] | masks[27])
    assert (panel.pixels[other] == image[other]).all()
    out = np.asarray(render_row(row, image))
    assert out.shape[1] == W and out.shape[0] > H  # one panel, untitled, its legend below
    assert (out[:H] == panel.pixels).all()
    legend = out[H:].reshape(-1, 3)
    for label in masks:
        assert (legend == class_color(label)).all(axis=1).sum() >= 25, label  # a swatch


@pytest.mark.parametrize("columns", [
    ("detections",), ("instances",), ("poses",), ("semantic",), ("detections", "semantic"),
    ("detections", "instances", "poses"), ("detections", "instances", "poses", "semantic"),
])
def test_one_panel_per_task_present(columns: tuple[str, ...]) -> None:
    image = _image(6)
    row = {"width": 2 * W, "height": 2 * H, "poses": None, **{c: [] for c in columns}}
    panels = draw_panels(row, image)
    assert len(panels) == len(columns) == len(tasks_present(row))
    out = render_row(row, image)
    assert out.width == len(columns) * W + (len(columns) - 1) * GAP
    if len(columns) == 1:
        assert out.size == (W, H)  # one panel is the image itself
        assert (np.asarray(out) == image).all()  # nothing found: nothing drawn
    else:
        assert out.height > H  # a title above each panel
        title_h = out.height - H
        for n in range(len(columns)):
            x0 = n * (W + GAP)
            assert (np.asarray(out)[title_h:, x0:x0 + W] == image).all()


def test_a_row_without_any_task_is_the_image() -> None:
    image = _image(7)
    row = _row(detections=None, semantic=None)
    assert draw_panels(row, image) == [] and (np.asarray(render_row(row, image)) == image).all()


def test_min_score_is_checked_by_render_and_the_cli(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"got -0.1"):
        render(str(tmp_path / "none"), str(tmp_path / "png"), min_score=-0.1)
    _one_line_error(lakelens("render", str(tmp_path), "--out", str(tmp_path / "png"),
                             "--min-score", "1.5"), "--min-score must be in [0, 1], got 1.5")
