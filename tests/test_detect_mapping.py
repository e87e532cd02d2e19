"""A detector trained here on synthetic rectangles finds them, in original pixels, through
the pipeline: on plain, EXIF-rotated, enlarged and reduced copies of the same scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.annotate import run
from pipelines.config import AnnotateConfig
from tests.helpers import TRAIN_IMAGE_SIZE, box_iou, read_results, shapes_scene, train_tiny_detector
from tests.zoo import EXIF_ORIENTATION

N_SCENES = 6


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_detector(tmp_path_factory.mktemp("model") / "rectangles.pt")


def _rot90_cw_boxes(boxes: np.ndarray, height: int) -> np.ndarray:
    """Boxes of an image after rotating it 90 degrees clockwise (upright = stored rotated)."""
    x0, y0, x1, y1 = boxes.T
    return np.stack([height - y1, x0, height - y0, x1], axis=1)


def test_detections_land_on_the_objects_in_original_pixels(ray_local, detector: Path,
                                                           tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    lake = tmp_path / "lake"
    lake.mkdir()
    expected: dict[str, np.ndarray] = {}
    for i in range(N_SCENES):
        scene = shapes_scene(rng)
        boxes = np.array([o.box for o in scene.objects], dtype=np.float32)
        im = Image.fromarray(scene.image)
        h = scene.image.shape[0]
        im.save(lake / f"{i}_plain.png")
        expected[f"{i}_plain.png"] = boxes
        im.resize((im.width * 3, im.height * 3), Image.Resampling.BILINEAR).save(
            lake / f"{i}_x3.jpg", quality=95)
        expected[f"{i}_x3.jpg"] = boxes * 3
        im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.BILINEAR).save(
            lake / f"{i}_small.png")
        expected[f"{i}_small.png"] = boxes * 0.75
        # Stored rotated 90 degrees counter-clockwise with orientation 6: a viewer (and
        # lakelens) rotates it back clockwise, so the upright image is the scene itself.
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6
        stored = im.transpose(Image.Transpose.ROTATE_90)
        stored.save(lake / f"{i}_exif.jpg", exif=exif.tobytes(), quality=95)
        expected[f"{i}_exif.jpg"] = boxes
        # And a scene rotated for real (no EXIF): boxes rotate with it.
        im.transpose(Image.Transpose.ROTATE_270).save(lake / f"{i}_rot.png")
        expected[f"{i}_rot.png"] = _rot90_cw_boxes(boxes, h)
    cfg = AnnotateConfig(sources=(str(lake),), out=str(tmp_path / "out"), tasks=("detect",),
                         weights={"detect": str(detector)}, image_size=TRAIN_IMAGE_SIZE,
                         batch_size=4)
    summary = run(cfg)
    assert summary.annotated == len(expected) and summary.errors == 0
    results = read_results(tmp_path / "out")
    assert results.column("models").to_pylist()[0][0]["arch"] == "fasterrcnn_tiny"
    matched = total = 0
    for row in results.to_pylist():
        truth = expected[Path(row["uri"]).name]
        dets = row["detections"]
        assert all(d["label_name"] == "rectangle" for d in dets)
        total += len(truth)
        if dets:
            iou = box_iou(truth, np.array([d["box"] for d in dets]))
            matched += int((iou.max(axis=1) >= 0.7).sum())
    # The model is small and briefly trained: most, not all, objects are found; a wrong
    # mapping (EXIF, resize) would match none of them.
    assert matched / total >= 0.8, (matched, total)
