"""`lakelens demo --quick`: every step of the demo runs and the last line is the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import lakelens


@pytest.mark.slow
def test_quick_demo_runs_every_step(tmp_path: Path) -> None:
    proc = lakelens("demo", "--quick", "--out", str(tmp_path / "demo"), "--images", "120")
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("box_AP", "box_AP50", "mask_AP", "mask_AP50", "keypoint_AP", "recall@1",
                "recall@4", "embed_recall@1", "embed_map@r", "embed_r_precision",
                "semantic_mIoU", "semantic_pixel_accuracy", "semantic_fwIoU",
                "annotate_images_per_s"):
        assert isinstance(figures[key], float) and figures[key] >= 0.0, key
    assert figures["embed_map@r"] <= figures["embed_r_precision"] <= 1.0
    assert "MAP@R" in proc.stdout and "semantic mIoU" in proc.stdout
    assert figures["semantic_pixel_accuracy"] > 0.0  # scored against the synth's class maps
    assert figures["val_images"] == 12 and figures["quick"] is True
    assert len(list((tmp_path / "demo" / "overlays").glob("*.png"))) == 12
    for task in ("detect", "segment", "pose", "semantic", "embed"):
        assert Path(figures["outputs"]["models"][task]).is_file()
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["recall@1"] == figures["recall@1"]
