"""benchmarks/annotate.py's parts that need no subprocess: the baselines' shared model step
keeps the column contract the Daft baseline declares, and the ratios pick the better
baseline (or none)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from benchmarks.annotate import compare, steady_rate
from benchmarks.baselines.predict import DocsPredictor, output_schema

TINY = {"detect": "fasterrcnn_tiny", "segment": "maskrcnn_tiny", "embed": "tiny",
        "semantic": "deeplabv3_tiny"}


@pytest.mark.parametrize("task", sorted(TINY))
def test_docs_predictor_columns_match_the_declared_schema(task):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8),
              rng.integers(0, 256, (120, 80, 3), dtype=np.uint8)]
    cols = DocsPredictor(task=task, arch=TINY[task], image_size=96, score_threshold=0.0)(images)
    schema = output_schema(task)
    assert sorted(cols) == sorted(schema.names)
    # what daft_udf.py returns to Daft: fails on a column of another type or length
    rows = pa.StructArray.from_arrays([pa.array(cols[f.name], f.type) for f in schema], fields=list(schema))
    assert len(rows) == 2
    if task == "embed":
        assert len(cols["embedding"][0]) == len(cols["embedding"][1]) > 0
    if task == "segment":
        assert [len(m) for m in cols["masks"]] == [len(b) for b in cols["boxes"]]
    if task == "semantic":  # one RLE per class present besides the background
        for per_image in cols["semantic"]:
            labels = [json.loads(s)["label"] for s in per_image]
            assert 0 not in labels and len(set(labels)) == len(labels)


def result(e2e: float, steady: float | None = None, images: int = 48) -> dict:
    return {"images": images, "e2e": e2e, "steady": steady}


def test_compare_takes_the_better_baseline_and_the_target():
    r = {"images": 48, "bare": result(2.0), "docs": result(3.0, 4.0), "daft": result(5.0, 5.0),
         "lakelens": result(6.0, 8.0)}
    compare(r)
    assert r["best_baseline"] == "daft"
    assert r["vs_best_baseline_e2e"] == 1.2 and r["meets_target"] is True
    assert (r["vs_docs_e2e"], r["vs_docs_steady"], r["vs_daft_steady"]) == (2.0, 2.0, 1.6)
    assert r["images_agree"] is True


def test_compare_without_daft_and_with_a_short_pipeline():
    r = {"images": 48, "bare": result(2.0), "docs": result(6.0), "daft": {"skipped": "daft not installed"},
         "lakelens": result(6.0, images=40)}
    compare(r)
    assert r["best_baseline"] == "docs" and r["vs_daft_e2e"] is None
    assert r["vs_best_baseline_e2e"] == 1.0 and r["meets_target"] is False
    assert r["images_agree"] is False


def test_steady_rate_is_the_middle_80_percent():
    assert steady_rate(np.arange(100) / 10.0) == pytest.approx(10.0)
    assert steady_rate([1.0] * 5) is None
