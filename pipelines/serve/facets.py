"""What the models saw, per index row, in numpy: the filters of a search run over these.

Built once per index version from the current view of the annotations table, streamed in
record batches:
- per index row: width, height, annotated_at, run, and whether it has a current ok row;
- posting lists per label (of the `detect` task, else `segment`): the sorted index rows
  of its detections, one posting per detection, with the detection's score beside it;
- posting lists per semantic region (a class present in the row's `semantic` column):
  sorted rows with the fraction of the image the class covers.

A filter with a label or a region starts from that posting list (min_score, min_count,
min_area are evaluated over its postings alone) and checks size, time and run on those
candidate rows only: it costs what it matches, not O(detections in the lake). A filter
of size, time or run alone is one vectorised pass over the per-row arrays.

Memory: 21 bytes per index row plus 8 bytes per detection and per region (int32 rows
while the index has < 2^31 rows, float32 values), one copy; an update of the index
(rows appended, replaced ones dead) copies the arrays and applies the table's changes
since the version they were read at (`Facets.updated`), reading only those changes.
"""

from __future__ import annotations

import logging
import time
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


class Postings:
    """Per code (a label or region), its sorted index rows, one entry per detection (a row
    repeats when it holds several), and a float32 value beside each (score or area
    fraction): rows[offsets[c]:offsets[c + 1]] are code c's."""

    def __init__(self, rows: np.ndarray, values: np.ndarray, offsets: np.ndarray):
        self.rows, self.values, self.offsets = rows, values, offsets

    @classmethod
    def build(cls, rows: np.ndarray, codes: np.ndarray, values: np.ndarray, n_codes: int,
              dtype: type) -> Postings:
        """From unordered (row, code, value) triples."""
        if len(rows):
            # (code, row) order; a row's own detections in any order
            order = np.argsort(codes.astype(np.int64) * (int(rows.max()) + 1) + rows)
            rows, codes, values = rows[order], codes[order], values[order]
        counts = np.bincount(codes, minlength=n_codes) if len(codes) else np.zeros(n_codes, np.int64)
        return cls(rows.astype(dtype), values.astype(np.float32), _offsets(counts))

    def __len__(self) -> int:
        return len(self.rows)

    def of(self, code: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, values) of one code (views, no copy)."""
        if code + 1 >= len(self.offsets):
            return self.rows[:0], self.values[:0]
        lo, hi = self.offsets[code], self.offsets[code + 1]
        return self.rows[lo:hi], self.values[lo:hi]

    def replaced(self, drop: np.ndarray, rows: np.ndarray, codes: np.ndarray, values: np.ndarray,
                 n_codes: int, dtype: type) -> Postings:
        """These postings without those of the rows where `drop` (bool per row) is set,
        plus the given (row, code, value) triples: one pass over the postings plus the
        insertion of the new ones (no sort of the whole)."""
        keep = ~drop[self.rows]
        kept_rows, kept_values = self.rows[keep].astype(dtype), self.values[keep]
        before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        old = self.offsets
        kept = np.diff(before[old]) if len(old) > 1 else np.zeros(0, np.int64)
        kept = np.concatenate([kept, np.zeros(n_codes - len(kept), np.int64)])
        start = _offsets(kept)
        if not len(rows):
            return Postings(kept_rows, kept_values, start)
        order = np.lexsort((rows, codes))
        rows, codes, values = rows[order].astype(dtype), codes[order], values[order].astype(np.float32)
        at = np.empty(len(rows), np.int64)
        bounds = np.flatnonzero(np.diff(codes)) + 1
        for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(codes)]]),
                          strict=True):
            c = int(codes[lo])
            segment = kept_rows[start[c]:start[c + 1]]
            at[lo:hi] = start[c] + np.searchsorted(segment, rows[lo:hi], side="right")
        counts = kept + np.bincount(codes, minlength=n_codes)
        return Postings(np.insert(kept_rows, at, rows), np.insert(kept_values, at, values),
                        _offsets(counts))


class Facets:
    """Per index row: size, time and run of its current table row; posting lists of its
    labels and regions. `Facets(table, ids)` reads the whole current view;
    `Facets.updated(...)` only the changes since an earlier Facets."""

    def __init__(self, table: LakeTable, ids: IdMap, *, batch_rows: int = 65_536):
        started = time.perf_counter()
        n = len(ids)
        self._empty(table, n)
        det: list[tuple] = []
        seg: list[tuple] = []
        for batch in table.current(self._columns(), batch_rows=batch_rows):
            rows = ids.rows_of(batch.column("image_id"))
            self._absorb(batch, rows, det, seg)
        dtype = _row_dtype(n)
        self.det = Postings.build(*_cat(det, dtype), len(self.labels), dtype)
        self.seg = Postings.build(*_cat(seg, dtype), len(self.regions), dtype)
        self.build_s = time.perf_counter() - started
        self.incremental = False
        logger.info("facets: %d of %d index rows in table version %d, %d %s, %d labels (%.1f s)",
                    int(self.present.sum()), n, self.table_version, len(self.det), self.source,
                    len(self.labels), self.build_s)

    def _empty(self, table: LakeTable, n: int) -> None:
        self.rows = n
        self.table = table  # at the version read: overlays draw from the same rows
        self.table_version = table.version
        self.width = np.zeros(n, np.int32)
        self.height = np.zeros(n, np.int32)
        self.at_us = np.zeros(n, np.int64)
        self.run = np.full(n, -1, np.int32)
        self.present = np.zeros(n, bool)  # has a current ok row in the table
        self.runs: dict[str, int] = {}
        self.labels: dict[str, int] = {}
        self.regions: dict[str, int] = {}
        self.source = label_source(table)
        self.semantic = table.model("semantic") is not None
        self.dtype = _row_dtype(n)

    def _columns(self) -> list[str]:
        return ["image_id", "width", "height", "annotated_at", "run_id", self.source,
                *(["semantic"] if self.semantic else [])]

    def _absorb(self, batch: pa.RecordBatch, rows: np.ndarray, det: list, seg: list) -> None:
        """Record the current ok rows of `batch` at index rows `rows` (-1: not indexed)."""
        hit = rows >= 0
        if not hit.any():
            return
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
            det.append((found[0].astype(self.dtype), found[1],
                        found[2].field("score").fill_null(0).to_numpy().astype(np.float32)))
        found = _entries(batch.column("semantic").filter(mask), r, self.regions) if self.semantic else None
        if found is not None:
            rr, codes, flat = found
            pixels = np.maximum(self.width[rr].astype(np.float64) * self.height[rr], 1.0)
            seg.append((rr.astype(self.dtype), codes,
                        (flat.field("area").fill_null(0).to_numpy() / pixels).astype(np.float32)))

    @classmethod
    def updated(cls, old: Facets, table: LakeTable, ids: IdMap, *, since: int,
                batch_rows: int = 16_384) -> Facets:
        """The facets of an updated index (`ids`: old's rows, the same images in the same
        order, then appended ones; replaced rows no longer live) over `table`, from `old`
        and the table's changes after version `since` (at most the version `old` was read
        at and the version the index update started from): equal to Facets(table, ids)
        but reading only the images changed since. Old arrays are copied, never changed
        (requests in flight still read them)."""
        started = time.perf_counter()
        n, n0 = len(ids), old.rows
        if n < n0:
            raise ValueError(f"an updated index has at least the old {n0} rows, got {n}")
        self = cls.__new__(cls)
        self._empty(table, n)
        if self.source != old.source or self.semantic != old.semantic:
            raise ValueError("the table's label source changed: build the facets afresh")
        for name in ("width", "height", "at_us", "run", "present"):
            getattr(self, name)[:n0] = getattr(old, name)
        self.runs, self.labels, self.regions = dict(old.runs), dict(old.labels), dict(old.regions)
        # rows that are no longer live (their image's vector was replaced or removed)
        touched = np.zeros(n, bool)
        touched[:n0] = self.present[:n0] & ~ids.live[:n0]
        self._clear(np.flatnonzero(touched))
        det: list[tuple] = []
        seg: list[tuple] = []
        changed = 0
        for part in table.parts():
            for batch in table.changes(part, since, [*self._columns(), "status"], batch_rows=batch_rows):
                rows = ids.rows_of(batch.column("image_id"))
                changed += batch.num_rows
                touched[rows[rows >= 0]] = True
                ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
                ok = ok.to_numpy(zero_copy_only=False)
                self._clear(rows[rows >= 0])
                self._absorb(batch, np.where(ok, rows, -1), det, seg)
        dtype = _row_dtype(n)
        self.det = old.det.replaced(touched, *_cat(det, dtype), len(self.labels), dtype)
        self.seg = old.seg.replaced(touched, *_cat(seg, dtype), len(self.regions), dtype)
        self.build_s = time.perf_counter() - started
        self.incremental = True
        logger.info("facets updated from table version %d to %d: %d changed images, %d rows appended "
                    "(%.2f s)", old.table_version, self.table_version, changed, n - n0, self.build_s)
        return self

    def _clear(self, rows: np.ndarray) -> None:
        self.present[rows] = False
        self.width[rows] = 0
        self.height[rows] = 0
        self.at_us[rows] = 0
        self.run[rows] = -1

    def info(self) -> dict:
        return {"table_version": self.table_version, "rows": self.rows,
                "present": int(self.present.sum()), "postings": len(self.det),
                "region_postings": len(self.seg), "labels": len(self.labels),
                "build_s": round(self.build_s, 3), "incremental": self.incremental}

    # -- queries ---------------------------------------------------------------------------

    def label_counts(self, min_score: float = 0.5) -> dict[str, int]:
        """Images per label (at least one detection of it scoring >= min_score)."""
        out = {}
        for name, code in sorted(self.labels.items(), key=lambda kv: kv[1]):
            rows, scores = self.det.of(code)
            count = _distinct(rows[scores >= min_score])
            if count:
                out[name] = count
        return out

    def region_counts(self) -> dict[str, int]:
        """Images per semantic class (present anywhere in the image)."""
        out = {}
        for name, code in sorted(self.regions.items(), key=lambda kv: kv[1]):
            count = _distinct(self.seg.of(code)[0])
            if count:
                out[name] = count
        return out

    def select(self, f: Filter) -> np.ndarray | None:
        """The index rows that pass the filter and have a current row: sorted unique int64;
        None when the filter sets no condition. Unknown labels, regions and runs are a
        LakelensError naming the valid ones."""
        if f.is_empty():
            return None
        candidates = None
        if f.label is not None:
            if f.label not in self.labels:
                known = ", ".join(sorted(self.labels)[:20]) or "none"
                raise LakelensError(f"unknown label {f.label!r}; the table's labels: {known}")
            rows, scores = self.det.of(self.labels[f.label])
            candidates = _at_least(rows[scores >= f.min_score], f.min_count)
        if f.region is not None:
            if f.region not in self.regions:
                known = ", ".join(sorted(self.regions)[:20]) or "none"
                raise LakelensError(f"unknown region {f.region!r}; the table's semantic classes: {known}")
            rows, fractions = self.seg.of(self.regions[f.region])
            found = _at_least(rows[fractions >= f.min_area], 1)
            candidates = found if candidates is None else _intersect(candidates, found)
        run = None
        if f.run_id is not None:
            if f.run_id not in self.runs:
                raise LakelensError(f"unknown run_id {f.run_id!r}: no current row was written by it")
            run = self.runs[f.run_id]
        if candidates is None:  # size, time or run alone: one pass over the per-row arrays
            return np.flatnonzero(self._keep(f, run, slice(None), self.present.copy())).astype(np.int64)
        candidates = candidates.astype(np.int64)
        return candidates[self._keep(f, run, candidates, self.present[candidates])]

    def _keep(self, f: Filter, run: int | None, at, keep: np.ndarray) -> np.ndarray:
        if f.min_width is not None:
            keep &= self.width[at] >= f.min_width
        if f.min_height is not None:
            keep &= self.height[at] >= f.min_height
        if f.since is not None:
            keep &= self.at_us[at] >= _us(f.since)
        if f.until is not None:
            keep &= self.at_us[at] < _us(f.until)
        if run is not None:
            keep &= self.run[at] == run
        return keep

    def mask(self, f: Filter) -> np.ndarray | None:
        """bool per index row (select's rows set), or None when the filter sets no condition."""
        rows = self.select(f)
        if rows is None:
            return None
        keep = np.zeros(self.rows, bool)
        keep[rows] = True
        return keep


def label_source(table: LakeTable) -> str:
    """The column whose labels the filters count: `instances` when the table was annotated
    with a segment model and no detect model, else `detections` (the schema has both
    columns; a task that was not asked leaves its column null)."""
    return "instances" if table.model("segment") and not table.model("detect") else "detections"


def _at_least(rows: np.ndarray, count: int) -> np.ndarray:
    """The distinct values of sorted `rows` that occur at least `count` times."""
    if not len(rows):
        return rows
    starts = np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]]))
    if count <= 1:
        return rows[starts]
    runs = np.diff(np.append(starts, len(rows)))
    return rows[starts[runs >= count]]


def _distinct(rows: np.ndarray) -> int:
    return int(len(rows) and 1 + np.count_nonzero(rows[1:] != rows[:-1]))


def _intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted unique a ∩ b, in O(min * log max)."""
    if len(a) > len(b):
        a, b = b, a
    if not len(a) or not len(b):
        return a[:0]
    at = np.minimum(np.searchsorted(b, a), len(b) - 1)
    return a[b[at] == a]


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def _row_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def _cat(pieces: list[tuple], dtype: type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not pieces:
        return np.zeros(0, dtype), np.zeros(0, np.int32), np.zeros(0, np.float32)
    return (np.concatenate([p[0] for p in pieces]).astype(dtype, copy=False),
            np.concatenate([p[1] for p in pieces]).astype(np.int32, copy=False),
            np.concatenate([p[2] for p in pieces]).astype(np.float32, copy=False))


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
    coded = _decode(codes, names_col.indices)
    if (coded < 0).any():  # an entry without a name matches no filter
        named = coded >= 0
        return np.repeat(rows, counts)[named], coded[named], flat.filter(pa.array(named))
    return np.repeat(rows, counts), coded, flat


def _decode(codes: list[int], indices: pa.Array) -> np.ndarray:
    """Our code for each entry of a dictionary-encoded column; -1 for a null."""
    table = np.asarray(codes + [-1], np.int32)
    return table[indices.fill_null(len(codes)).to_numpy()]


def _ints(a: pa.Array) -> np.ndarray:
    return a.fill_null(0).to_numpy().astype(np.int32)


def _us(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000)
