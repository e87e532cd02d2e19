"""The model stage over pyarrow batches (the read stage is read.py). They know nothing of
Ray; job.py wires them.

A batch carries, besides the result columns, the decoded pixels (dropped by the last
model stage) and three error columns: a row whose `error_stage` is set is skipped by
later stages and ends in the errors table.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
import time

import numpy as np
import pyarrow as pa
import torch

from models.predict import DetectionPredictor, EmbeddingPredictor, predict_each
from models.semantic import SemanticPredictor
from pipelines.annotate.encode import ENCODERS
from pipelines.annotate.read import ERROR_COLUMNS, PIXEL_COLUMNS, error_message
from pipelines.cluster.weights import install_shipped
from pipelines.config import TaskConfig
from pipelines.lake.sources import is_remote
from pipelines.lake.table import output_fs
from pipelines.schema import TASK_COLUMNS

logger = logging.getLogger(__name__)


class ModelStage:
    """One model task over decoded batches: predict, encode to original pixels, append
    the task's column. A failing batch is retried image by image; only the images that
    still fail become error rows."""

    def __init__(self, cfg: TaskConfig, column_type: pa.DataType, drop_pixels: bool = False):
        torch.set_num_threads(max(1, cfg.torch_threads))
        if cfg.task == "embed":
            self.predictor = EmbeddingPredictor(cfg.arch, weights=cfg.weights, device=cfg.device,
                                                max_batch=cfg.batch_size)
        elif cfg.task == "semantic":
            self.predictor = SemanticPredictor(cfg.arch, weights=cfg.weights, image_size=cfg.image_size,
                                               device=cfg.device, max_batch=cfg.batch_size)
        else:
            self.predictor = DetectionPredictor(
                cfg.arch, weights=cfg.weights, image_size=cfg.image_size,
                score_threshold=cfg.score_threshold, device=cfg.device, max_batch=cfg.batch_size)
        self.task = cfg.task
        self.labels = self.predictor.info.labels
        self.column = TASK_COLUMNS[cfg.task]
        self.column_type = column_type
        self.drop_pixels = drop_pixels
        logger.info("%s stage ready: %s (%s) on %s", cfg.task, cfg.arch,
                    self.predictor.info.weights_id, self.predictor.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        stage = batch.column("error_stage").to_pylist()
        etype = batch.column("error_type").to_pylist()
        emsg = batch.column("error_message").to_pylist()
        ok = [i for i in range(n) if stage[i] is None]
        values: list = [None] * n
        images: dict[int, np.ndarray] = {}
        pixels, dw, dh = (batch.column(c) for c in PIXEL_COLUMNS)
        for i in ok:
            try:
                images[i] = np.frombuffer(pixels[i].as_buffer(), dtype=np.uint8).reshape(
                    dh[i].as_py(), dw[i].as_py(), 3)
            except Exception as e:  # a malformed row must not sink the batch
                stage[i], etype[i], emsg[i] = self.task, type(e).__name__, error_message(e)
        if images:
            outputs = predict_each(self.predictor, list(images.values()))
            width, height = batch.column("width"), batch.column("height")
            for (i, image), out in zip(images.items(), outputs, strict=True):
                if isinstance(out, Exception):
                    stage[i], etype[i], emsg[i] = self.task, type(out).__name__, error_message(out)
                    continue
                w, h = width[i].as_py(), height[i].as_py()
                try:
                    values[i] = ENCODERS[self.task](
                        out, scale=(w / image.shape[1], h / image.shape[0]), width=w, height=h,
                        labels=self.labels)
                except Exception as e:
                    stage[i], etype[i], emsg[i] = "encode", type(e).__name__, error_message(e)
        out_table = batch.drop_columns(list(ERROR_COLUMNS))
        if self.drop_pixels:
            out_table = out_table.drop_columns(list(PIXEL_COLUMNS))
        out_table = out_table.append_column(self.column, pa.array(values, type=self.column_type))
        for name, col in zip(ERROR_COLUMNS, (stage, etype, emsg), strict=True):
            out_table = out_table.append_column(name, pa.array(col, type=pa.string()))
        return out_table


TRIM_EVERY = 50  # batches between returning freed heap pages to the OS


def _trim_heap() -> None:
    """Give glibc's freed-but-kept heap pages back to the OS. Batches of decoded images
    and model activations of varying sizes fragment malloc's arenas, and a long-lived
    actor's RSS would otherwise creep up with the length of the run."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


REMOTE_FLUSH_S = 5.0
MAX_DONE_BINS = 512  # per actor record: a 10-hour run keeps ~1-minute bins


class ActorStats:
    """What one model actor did: busy seconds and images per task, where it ran (host,
    raylet pid = node, the GPUs Ray gave it). Written as JSON to `stats_dir` after every
    batch, so the driver can report it after the pass; nothing is written without one."""

    def __init__(self, stats_dir: str | None, tasks: list[str]):
        host, self.path = socket.gethostname(), None
        self.remote, self.written_at = bool(stats_dir) and is_remote(stats_dir), None
        if stats_dir:
            self.fs, root = output_fs(stats_dir)
            self.fs.create_dir(root, recursive=True)
            self.path = f"{root}/{host}-{os.getpid()}.json"
        self.record = {
            "host": host, "node": os.environ.get("RAY_RAYLET_PID"),
            "pid": os.getpid(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "tasks": {t: {"busy_s": 0.0, "images": 0, "batches": 0} for t in tasks}}

    def add(self, task: str, seconds: float, images: int) -> None:
        t = self.record["tasks"][task]
        t["busy_s"] += seconds
        t["images"] += images
        t["batches"] += 1

    def done(self, images: int) -> None:
        """Images through every model of this actor, binned by when (epoch seconds, bins
        `done_bin_s` wide, widened as the run grows so the record stays small)."""
        width = self.record.setdefault("done_bin_s", 1)
        bins = self.record.setdefault("done", {})
        key = str(int(time.time() // width * width))
        bins[key] = bins.get(key, 0) + images
        if len(bins) > MAX_DONE_BINS:
            width *= 2
            merged: dict[str, int] = {}
            for k, v in bins.items():
                k2 = str(int(int(k) // width * width))
                merged[k2] = merged.get(k2, 0) + v
            self.record.update(done_bin_s=width, done=merged)

    def flush(self) -> None:
        """After a batch: at once on a local disk; on an object store at most every
        REMOTE_FLUSH_S (one PUT per batch per actor adds up on a big cluster), so the
        record may lag the actor's last seconds of work there."""
        if not self.path:
            return
        now = time.monotonic()
        if self.remote and self.written_at is not None and now - self.written_at < REMOTE_FLUSH_S:
            return
        self.record["as_of"] = time.time()
        data = json.dumps(self.record).encode()
        if self.remote:  # an object store PUT is all or nothing
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        else:  # a worker killed mid-write must not leave half a record: write, then rename
            tmp = f"{self.path}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        self.written_at = now


class FusedStage:
    """Model tasks in one actor, run one after another on the same decoded batch: on a GPU
    one such actor holds the whole GPU and every asked model (no pixels copied between
    pools, no fractional GPUs). Also the CPU pools' stage, with one task each."""

    def __init__(self, cfgs: list[TaskConfig], column_types: list[pa.DataType],
                 drop_pixels: bool = True, stats_dir: str | None = None,
                 weights_files: dict | None = None):
        created = time.time()
        install_shipped(weights_files)
        self.stages = [ModelStage(cfg, typ, drop_pixels=drop_pixels and n == len(cfgs) - 1)
                       for n, (cfg, typ) in enumerate(zip(cfgs, column_types, strict=True))]
        self.stats = ActorStats(stats_dir, [c.task for c in cfgs])
        self.stats.record.update(created_at=created, ready_at=time.time())
        self._batches = 0
        self.stats.flush()  # an actor that never gets a batch is still on the record

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.stats.record.setdefault("first_batch_at", time.time())
        for stage in self.stages:
            started = time.perf_counter()
            batch = stage(batch)
            self.stats.add(stage.task, time.perf_counter() - started, batch.num_rows)
        self.stats.done(batch.num_rows)
        self.stats.flush()
        self._batches += 1
        if self._batches % TRIM_EVERY == 0:
            _trim_heap()
        return batch
