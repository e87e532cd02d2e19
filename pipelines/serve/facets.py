"""What the models saw, per index row, in numpy: the filters of a search run over these.

Built once per (index version, table version) from the current view of the annotations
table, streamed in record batches: per row width, height, annotated_at and run; per
detection (of the `detect` task, else `segment`) its row, label code and score; per
semantic region (a class present in the row's `semantic` column) its row, class code and
the fraction of the image it covers. A filter
is a few vectorised passes over those arrays and becomes a bool mask over index rows,
which the index turns into an ID selector inside the FAISS search.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index.idmap import IdMap
from models.errors import LakelensError
from pipelines.lake.table import LakeTable

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Filter:
    """A search filter; every field None/empty means "no condition"."""

    label: str | None = None
    min_count: int = 1
    min_score: float = 0.5
    min_width: int | None = None
    min_height: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    run_id: str | None = None
    region: str | None = None  # a semantic class covering at least min_area of the image
    min_area: float = 0.0

    def is_empty(self) -> bool:
        return (self.label is None and self.min_width is None and self.min_height is None
                and self.since is None and self.until is None and self.run_id is None
                and self.region is None)


class Facets:
    """Per index row: size, time and run of its current table row; its detections."""

    def __init__(self, table: LakeTable, ids: IdMap, *, batch_rows: int = 65_536):
        n = len(ids)
        self.rows = n
        self.table = table  # at the version read: overlays draw from the same rows
        self.table_version = table.version
        self.width = np.zeros(n, np.int32)
        self.height = np.zeros(n, np.int32)
        self.at_us = np.zeros(n, np.int64)
        self.run = np.full(n, -1, np.int32)
        self.present = np.zeros(n, bool)  # has a current ok row in the table
        self.runs: dict[str, int] = {}
        self.source = label_source(table)
        det_rows, det_labels, det_scores = [], [], []
        self.labels: dict[str, int] = {}
        self.regions: dict[str, int] = {}
        seg_rows, seg_labels, seg_fracs = [], [], []
        semantic = table.model("semantic") is not None
        columns = ["image_id", "width", "height", "annotated_at", "run_id"]
        columns.append(self.source)
        if semantic:
            columns.append("semantic")
        for batch in table.current(columns, batch_rows=batch_rows):
            rows = ids.rows_of(batch.column("image_id"))
            hit = rows >= 0
            if not hit.any():
                continue
            r = rows[hit]
            mask = pa.array(hit)
            self.present[r] = True
            self.width[r] = _ints(batch.column("width").filter(mask))
            self.height[r] = _ints(batch.column("height").filter(mask))
            self.at_us[r] = batch.column("annotated_at").filter(mask).cast(
                pa.timestamp("us", tz="UTC")).cast(pa.int64()).fill_null(0).to_numpy()
            runs = batch.column("run_id").filter(mask).cast(pa.string()).dictionary_encode()
            codes = [self.runs.setdefault(name, len(self.runs)) for name in runs.dictionary.to_pylist()]
            self.run[r] = _decode(codes, runs.indices)
            found = _entries(batch.column(self.source).filter(mask), r, self.labels)
            if found is not None:
                det_rows.append(found[0])
                det_labels.append(found[1])
                det_scores.append(found[2].field("score").fill_null(0).to_numpy().astype(np.float32))
            found = _entries(batch.column("semantic").filter(mask), r, self.regions) if semantic else None
            if found is not None:
                rr, codes, flat = found
                pixels = np.maximum(self.width[rr].astype(np.float64) * self.height[rr], 1.0)
                seg_rows.append(rr)
                seg_labels.append(codes)
                seg_fracs.append((flat.field("area").fill_null(0).to_numpy() / pixels).astype(np.float32))
        self.det_row = np.concatenate(det_rows) if det_rows else np.zeros(0, np.int64)
        self.det_label = np.concatenate(det_labels) if det_labels else np.zeros(0, np.int32)
        self.det_score = np.concatenate(det_scores) if det_scores else np.zeros(0, np.float32)
        self.seg_row = np.concatenate(seg_rows) if seg_rows else np.zeros(0, np.int64)
        self.seg_label = np.concatenate(seg_labels) if seg_labels else np.zeros(0, np.int32)
        self.seg_frac = np.concatenate(seg_fracs) if seg_fracs else np.zeros(0, np.float32)
        logger.info("facets: %d of %d index rows in table version %d, %d %s, %d labels",
                    int(self.present.sum()), n, self.table_version, len(self.det_row),
                    self.source, len(self.labels))

    def label_counts(self, min_score: float = 0.5) -> dict[str, int]:
        """Images per label (at least one detection of it scoring >= min_score)."""
        keep = self.det_score >= min_score
        pairs = np.unique(np.stack([self.det_row[keep], self.det_label[keep]]), axis=1) \
            if keep.any() else np.zeros((2, 0), np.int64)
        per = np.bincount(pairs[1].astype(np.int64), minlength=len(self.labels))
        names = sorted(self.labels, key=self.labels.get)
        return {name: int(per[i]) for i, name in enumerate(names) if per[i]}

    def region_counts(self) -> dict[str, int]:
        """Images per semantic class (present anywhere in the image)."""
        per = np.bincount(self.seg_label.astype(np.int64), minlength=len(self.regions))
        names = sorted(self.regions, key=self.regions.get)
        return {name: int(per[i]) for i, name in enumerate(names) if per[i]}

    def mask(self, f: Filter) -> np.ndarray | None:
        """bool per index row, or None when the filter sets no condition."""
        if f.is_empty():
            return None
        keep = self.present.copy()
        if f.label is not None:
            if f.label not in self.labels:
                known = ", ".join(sorted(self.labels)[:20]) or "none"
                raise LakelensError(f"unknown label {f.label!r}; the table's labels: {known}")
            hits = (self.det_label == self.labels[f.label]) & (self.det_score >= f.min_score)
            count = np.bincount(self.det_row[hits], minlength=self.rows)
            keep &= count >= f.min_count
        if f.min_width is not None:
            keep &= self.width >= f.min_width
        if f.min_height is not None:
            keep &= self.height >= f.min_height
        if f.since is not None:
            keep &= self.at_us >= _us(f.since)
        if f.until is not None:
            keep &= self.at_us < _us(f.until)
        if f.region is not None:
            if f.region not in self.regions:
                known = ", ".join(sorted(self.regions)[:20]) or "none"
                raise LakelensError(f"unknown region {f.region!r}; the table's semantic classes: {known}")
            hits = (self.seg_label == self.regions[f.region]) & (self.seg_frac >= f.min_area)
            keep &= np.bincount(self.seg_row[hits], minlength=self.rows) > 0
        if f.run_id is not None:
            if f.run_id not in self.runs:
                raise LakelensError(f"unknown run_id {f.run_id!r}: no current row was written by it")
            keep &= self.run == self.runs[f.run_id]
        return keep


def label_source(table: LakeTable) -> str:
    """The column whose labels the filters count: `instances` when the table was annotated
    with a segment model and no detect model, else `detections` (the schema has both
    columns; a task that was not asked leaves its column null)."""
    return "instances" if table.model("segment") and not table.model("detect") else "detections"


def _entries(lists: pa.Array, rows: np.ndarray, names: dict[str, int]
             ) -> tuple[np.ndarray, np.ndarray, pa.StructArray] | None:
    """A list<struct{label_name, ...}> column of the given index rows, flattened: each
    entry's row, its name's code (new names added to `names`) and the entries; None when
    there is none."""
    counts = pc.list_value_length(lists).fill_null(0).to_numpy()
    flat = pc.list_flatten(lists)
    if not len(flat):
        return None
    names_col = flat.field("label_name").cast(pa.string()).dictionary_encode()
    codes = [names.setdefault(x, len(names)) for x in names_col.dictionary.to_pylist()]
    return np.repeat(rows, counts), _decode(codes, names_col.indices), flat


def _decode(codes: list[int], indices: pa.Array) -> np.ndarray:
    """Our code for each entry of a dictionary-encoded column; -1 for a null."""
    table = np.asarray(codes + [-1], np.int32)
    return table[indices.fill_null(len(codes)).to_numpy()]


def _ints(a: pa.Array) -> np.ndarray:
    return a.fill_null(0).to_numpy().astype(np.int32)


def _us(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000)
