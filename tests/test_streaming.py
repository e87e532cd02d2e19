"""eval, export coco, render and `results --out` stream the table: a few thousand synthetic
rows read in small batches give complete, correct output, through more than one batch of
`LakeTable.current` and never the table whole (no timing, no large data)."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from pipelines.coco import evaluate, export
from pipelines.lake import results
from pipelines.lake.table import LakeTable
from pipelines.render import render
from tests.helpers import commit_rows
from tests.test_cli import lakelens

IN_GT = 3000  # rows whose image is in the ground truth
ELSEWHERE = 500  # rows whose image is not
BATCH = 256
CATEGORIES = ["square", "disc"]


def _boxes(i: int) -> list[list[float]]:
    """One or two xywh boxes of image i (64 x 48), a deterministic function of i."""
    boxes = [[float(i % 7), float(i % 5), 20.0, 16.0]]
    if i % 2:
        boxes.append([40.0, 24.0, 12.0 + i % 3, 10.0])
    return boxes


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(table DIR, ground truth JSON): IN_GT + ELSEWHERE current rows, committed in chunks
    as annotate would, with detections equal to the ground truth's boxes."""
    root = tmp_path_factory.mktemp("streaming")
    images, annotations = [], []
    for i in range(1, IN_GT + 1):
        images.append({"id": i, "file_name": f"img{i}.jpg", "width": 64, "height": 48})
        for n, (x, y, w, h) in enumerate(_boxes(i)):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": n + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    gt = root / "annotations.json"
    gt.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
        {"id": n + 1, "name": name} for n, name in enumerate(CATEGORIES)]}))
    rows = []
    for i in range(1, IN_GT + ELSEWHERE + 1):
        dets = [{"box": [x, y, x + w, y + h], "label": n + 1, "score": 0.9, "label_name": CATEGORIES[n]}
                for n, (x, y, w, h) in enumerate(_boxes(i))]
        uri = str(root / f"img{i}.jpg") if i <= IN_GT else f"/elsewhere/other{i}.jpg"
        rows.append({"image_id": f"id{i:05d}", "uri": uri, "content_hash": "x", "width": 64,
                     "height": 48, "detections": dets, "models": []})
    table = root / "out"
    for start in range(0, len(rows), 1000):
        commit_rows(table, rows[start:start + 1000])
    return table, gt


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the batches `LakeTable.current` yields; reading the table whole
    (`current_table`) fails the test."""
    sizes: list[int] = []
    current = LakeTable.current

    def counted(self: LakeTable, *args, **kwargs) -> Iterator[pa.RecordBatch]:
        for batch in current(self, *args, **kwargs):
            sizes.append(batch.num_rows)
            yield batch

    def whole(self: LakeTable, *args, **kwargs) -> pa.Table:
        raise AssertionError("the table was read whole")

    monkeypatch.setattr(LakeTable, "current", counted)
    monkeypatch.setattr(LakeTable, "current_table", whole)
    return sizes


def _streamed(sizes: list[int], rows: int) -> None:
    assert len(sizes) > 1 and max(sizes) <= BATCH and sum(sizes) == rows, sizes


def _boxes_total(rows: range) -> int:
    return sum(len(_boxes(i)) for i in rows)


def test_export_streams_a_loadres_file_with_every_prediction(lake, batches, tmp_path) -> None:
    table, gt_path = lake
    paths = export(str(table), str(tmp_path / "preds.json"), gt_path=str(gt_path), batch_rows=BATCH)
    _streamed(batches, IN_GT + ELSEWHERE)
    assert paths == {"bbox": str(tmp_path / "preds.json")}
    gt = COCO(str(gt_path))
    dt = gt.loadRes(paths["bbox"])
    assert len(dt.getAnnIds()) == _boxes_total(range(1, IN_GT + 1))  # rows outside the GT left out
    assert set(dt.getImgIds()) == set(gt.getImgIds())
    assert sorted(a["bbox"] for a in dt.dataset["annotations"]) == sorted(
        a["bbox"] for a in gt.dataset["annotations"])
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was moved into place

    batches.clear()
    plain = export(str(table), str(tmp_path / "all.json"), batch_rows=BATCH)["bbox"]
    _streamed(batches, IN_GT + ELSEWHERE)
    items = json.loads(Path(plain).read_text())  # one valid JSON array
    assert len(items) == _boxes_total(range(1, IN_GT + ELSEWHERE + 1))
    assert {p["image_id"] for p in items} == set(range(1, IN_GT + ELSEWHERE + 1))  # ids as streamed


def test_export_holds_one_batch_of_predictions_not_all(lake, batches, tmp_path) -> None:
    table, _ = lake
    tracemalloc.start()
    try:
        export(str(table), str(tmp_path / "preds.json"), batch_rows=BATCH)
        _, streamed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        held = json.loads((tmp_path / "preds.json").read_text())  # what holding them all takes
        everything = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(held) == _boxes_total(range(1, IN_GT + ELSEWHERE + 1))
    assert streamed_peak < everything / 2, (streamed_peak, everything)


def test_eval_keeps_only_ground_truth_images_while_streaming(lake, batches) -> None:
    table, gt_path = lake
    report = evaluate(str(table), str(gt_path), batch_rows=BATCH)
    _streamed(batches, IN_GT + ELSEWHERE)
    assert report["images"] == IN_GT and report["unmatched_images"] == ELSEWHERE
    assert set(report["tasks"]) == {"bbox"}
    assert report["tasks"]["bbox"]["stats"]["AP"] == pytest.approx(1.0)


def test_render_stops_reading_at_the_limit(lake, batches, tmp_path) -> None:
    table, _ = lake
    written, failed = render(str(table), str(tmp_path / "png"), limit=5, batch_rows=2)
    assert (written, failed) == (0, 5)  # the synthetic images do not exist: counted, not drawn
    assert batches == [2, 2, 2]  # 5 rows need 3 batches of 2; the scan stopped there


def test_results_out_streams_the_whole_view_to_parquet_and_csv(lake, tmp_path) -> None:
    table, _ = lake
    view = IN_GT + ELSEWHERE
    rows = results.write(str(table), None, str(tmp_path / "all.parquet"), batch_rows=500)
    assert rows == view
    written = pq.ParquetFile(tmp_path / "all.parquet")
    assert written.metadata.num_rows == view
    assert written.metadata.num_row_groups > 1  # one row group per streamed batch
    ids = written.read(columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == [f"id{i:05d}" for i in range(1, view + 1)]
    assert "detections" in written.schema_arrow.names and "embedding" not in written.schema_arrow.names

    sql = "SELECT image_id, uri, len(detections) AS n, detections FROM results"
    assert results.write(str(table), sql, str(tmp_path / "some.csv"), batch_rows=500) == view
    csv = pacsv.read_csv(tmp_path / "some.csv")
    assert csv.column_names == ["image_id", "uri", "n"]  # the nested column is left out
    assert csv.num_rows == view
    assert sum(csv.column("n").to_pylist()) == _boxes_total(range(1, view + 1))
    assert not list(tmp_path.glob("*.tmp"))


def test_results_prints_the_first_rows_and_says_there_are_more(lake) -> None:
    table, _ = lake
    head = results.query(str(table), "SELECT image_id FROM results ORDER BY image_id",
                         limit=results.MAX_PRINT_ROWS + 1)
    assert head.num_rows == results.MAX_PRINT_ROWS + 1
    text = results.format_table(head)
    assert "id00050" in text and "id00051" not in text and "more rows" in text
    proc = lakelens("results", str(table), "--sql", "SELECT image_id FROM results ORDER BY image_id")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "more rows" in proc.stdout and "id00051" not in proc.stdout
