"""The run's report: its summary (printed, returned), the record in DIR/runs/RUN_ID.json,
and what the model actors say they did (ActorStats records, steady rates, one log line
per actor)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow.fs as pafs

from models.registry import ModelInfo
from pipelines import version
from pipelines.annotate.commit import Committer, steady_rate
from pipelines.config import AnnotateConfig
from pipelines.lake.table import location, output_fs, write_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    out: str
    listed: int
    new: int
    changed: int
    unchanged: int
    vanished: int
    retried: int  # error rows of earlier runs tried again
    annotated: int
    errors: int
    crashed: int  # of the errors: images whose worker died every time
    read_retries: int  # transient read failures retried within the run
    skipped: dict[str, int]  # non-image files by extension
    wall_s: float
    table_version: int
    top_errors: str = ""
    error_rate_exceeded: bool = False
    max_error_rate: float = 0.5
    index: dict = field(default_factory=dict)
    steady_images_per_s: float | None = None  # between the 10th and 90th percentile of rows out
    stale: int = 0  # results of another embedder redone (a --full run cut short)
    unlistable: int = 0  # images under directories that could not be listed (kept as they were)
    unlisted_dirs: tuple[str, ...] = ()

    @property
    def tried(self) -> int:
        return self.annotated + self.errors

    @property
    def images_per_s(self) -> float:
        return self.tried / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def skipped_non_images(self) -> int:
        return sum(self.skipped.values())

    def counts(self) -> dict:
        return {"listed": self.listed, "new": self.new, "changed": self.changed,
                "unchanged": self.unchanged, "vanished": self.vanished, "retried": self.retried,
                "annotated": self.annotated, "errors": self.errors, "crashed": self.crashed,
                "read_retries": self.read_retries, "skipped_non_images": self.skipped_non_images,
                "stale": self.stale, "unlistable": self.unlistable}

    def describe(self) -> str:
        skipped = ", ".join(f"{n} {ext}" for ext, n in sorted(self.skipped.items()))
        text = (f"Run {self.run_id}: {self.listed} images listed ({self.new} new, {self.changed} "
                f"changed, {self.unchanged} unchanged, {self.vanished} vanished, {self.retried} "
                f"earlier errors retried); {self.annotated} annotated, {self.errors} errors"
                + (f" ({self.crashed} crashed their worker)" if self.crashed else "")
                + f", in {self.wall_s:.1f} s ({self.images_per_s:.2f} images/s). ")
        if skipped:
            text += f"Skipped non-image files: {skipped}. "
        if self.unlisted_dirs:
            text += (f"Could not list {len(self.unlisted_dirs)} directories ({self.unlistable} images "
                     f"under them kept as they were): {', '.join(self.unlisted_dirs[:3])}. ")
        text += (f"Table {location(self.out, 'table')} at version {self.table_version}; run record "
                 f"{self.out}/runs/{self.run_id}.json.")
        if self.index:
            text += f" Index {self.index['path']}: {self.index['summary']}."
        return text

    def error_line(self) -> str:
        return (f"{self.errors} of {self.tried} images failed (rate {self.errors / max(self.tried, 1):.2f}"
                f" > --max-error-rate {self.max_error_rate}): {self.top_errors}; what was "
                "committed stays committed")


def actor_stats(stats_dir: str) -> list[dict]:
    """The ActorStats records the model actors of a pass wrote."""
    fs, root = output_fs(stats_dir)
    records = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.path.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                data = f.read()
            try:  # statistics only: one unreadable record must not fail the run
                records.append(json.loads(data))
            except ValueError:
                logger.warning("skipping an unreadable actor record %s (%d bytes)", info.path, len(data))
    return records


def pool_steady_rate(actors: list[dict], last_task: str) -> float | None:
    """The steady rate of the last model pass, from when its actors finished each batch
    (rows out of the driver come in bursts; the actors' own clocks do not)."""
    last = [a for a in actors if last_task in a["tasks"] and a.get("done")]
    if not last:
        return None
    width = max(a["done_bin_s"] for a in last)
    bins: Counter = Counter()
    for a in last:
        for start, n in a["done"].items():
            bins[int(start) // width * width] += n
    return steady_rate(bins)


def log_actors(run_id: str, actors: list[dict], wall: float) -> None:
    t0 = time.time() - wall  # when the run started; the actors' times are wall clock

    def at(a: dict, key: str) -> str:
        return f"{a[key] - t0:.1f} s" if key in a else "-"

    for a in actors:
        busy = ", ".join(f"{t} {v['busy_s']:.1f} s/{v['images']} images" for t, v in a["tasks"].items())
        logger.info("run %s: model actor pid %s on %s (raylet %s)%s: %s (run %.1f s; started %s, "
                    "ready %s, first batch %s, last %s)", run_id, a["pid"], a["host"], a["node"],
                    f" GPU {a['gpus']}" if a.get("gpus") else "", busy, wall, at(a, "created_at"),
                    at(a, "ready_at"), at(a, "first_batch_at"), at(a, "as_of"))


def write_record(cfg: AnnotateConfig, summary: RunSummary, infos: list[ModelInfo], committer: Committer,
                 *, base_version: int, actors: list[dict], upkeep: dict, failed: str | None = None) -> None:
    """DIR/runs/RUN_ID.json: arguments, models, counts, versions, timings, upkeep; `status`
    is "succeeded", or "failed" with `error` (the counts are then what it did before)."""
    record = {"run_id": summary.run_id, "lakelens_version": version(),
              "status": "failed" if failed else "succeeded", "error": failed,
              "config": dataclasses.asdict(cfg),
              "models": [dataclasses.asdict(i) | {"labels": len(i.labels)} for i in infos],
              "counts": summary.counts(), "skipped": summary.skipped, "top_errors": summary.top_errors,
              "table_version_before": base_version, "table_version": summary.table_version,
              "chunks": committer.seq, "wall_s": round(summary.wall_s, 3), "actors": actors,
              "upkeep": upkeep, "unlisted_dirs": list(summary.unlisted_dirs),
              "decode_nodes": dict(committer.decode_nodes),
              "images_per_s": round(summary.images_per_s, 3), **committer.throughput(),
              "steady_images_per_s": summary.steady_images_per_s,
              "timeline_s": committer.timeline,
              "index": summary.index,
              "finished_at": datetime.now(UTC).isoformat()}
    fs, root = output_fs(cfg.out)
    write_json(fs, f"{root}/runs/{summary.run_id}.json", record)
