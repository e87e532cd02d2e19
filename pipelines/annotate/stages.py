"""Ray Data stages over pyarrow batches. They know nothing of Ray; annotate.py wires them.

A batch carries, besides the result columns, the decoded pixels (dropped by the last
model stage) and three error columns: a row whose `error_stage` is set is skipped by
later stages and ends in the errors table.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import numpy as np
import pyarrow as pa
import torch

from models.decode import content_hash, decode_image
from models.predict import DetectionPredictor, EmbeddingPredictor, predict_each
from pipelines.annotate.encode import ENCODERS
from pipelines.config import TaskConfig
from pipelines.lake.sources import read_bytes
from pipelines.schema import TASK_COLUMNS

logger = logging.getLogger(__name__)

ERROR_COLUMNS = ("error_stage", "error_type", "error_message")
PIXEL_COLUMNS = ("pixels", "dec_width", "dec_height")
MAX_MESSAGE = 500
READ_ATTEMPTS = 3
READ_BACKOFF_S = 0.5  # doubled after each failed attempt
TRANSIENT_HINTS = ("timed out", "timeout", "connection reset", "connection aborted", "throttl",
                   "slowdown", "slow down", "slow_down", "reduce your request rate",
                   "too many requests", "service unavailable",
                   "internal error", " 500", " 502", " 503", " 504", "temporarily")


FAULT_ENV = "LAKELENS_FAULT_KILL_ON"  # fault-injection tests: a URI suffix that kills its reader


def _maybe_crash(uri: str) -> None:
    """Fault injection for tests: SIGKILL this worker process when it reads a URI ending
    with $LAKELENS_FAULT_KILL_ON (a real crash, as a decoder segfault would be)."""
    suffix = os.environ.get(FAULT_ENV)
    if suffix and uri.endswith(suffix):
        os.kill(os.getpid(), signal.SIGKILL)


def is_transient(exc: BaseException) -> bool:
    """Timeouts, connection resets, 5xx and throttling: worth another try."""
    if isinstance(exc, TimeoutError | ConnectionError | InterruptedError):
        return True
    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return False
    text = str(exc).lower()
    return any(h in text for h in TRANSIENT_HINTS)


def read_with_retries(uri: str, *, attempts: int = READ_ATTEMPTS,
                      backoff_s: float = READ_BACKOFF_S) -> tuple[bytes, int]:
    """The object's bytes and how many transient failures were retried on the way."""
    for attempt in range(attempts):
        try:
            return read_bytes(uri), attempt
        except Exception as e:
            if attempt + 1 == attempts or not is_transient(e):
                raise
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:MAX_MESSAGE]


def read_decode(batch: pa.Table, *, max_pixels: int, short: int | None,
                long: int | None) -> pa.Table:
    """(image_id, uri, ...) -> + content_hash, width, height, pixels, dec_*, read_retries and
    error columns; the input columns pass through."""
    n = batch.num_rows
    cols: dict[str, list] = {k: [None] * n for k in (
        "content_hash", "width", "height", "pixels", "dec_width", "dec_height") + ERROR_COLUMNS}
    retries = [0] * n
    for i, uri in enumerate(batch.column("uri").to_pylist()):
        _maybe_crash(uri)
        try:
            data, retries[i] = read_with_retries(uri)
        except Exception as e:  # missing, broken symlink, permission, network
            cols["error_stage"][i], cols["error_type"][i] = "read", type(e).__name__
            cols["error_message"][i] = _message(e)
            continue
        cols["content_hash"][i] = content_hash(data)
        try:
            dec = decode_image(data, max_pixels=max_pixels, short=short, long=long)
        except Exception as e:  # DecodeError subclasses, MemoryError, PIL internals
            cols["error_stage"][i], cols["error_type"][i] = "decode", type(e).__name__
            cols["error_message"][i] = _message(e)
            continue
        h, w = dec.pixels.shape[:2]
        cols["width"][i], cols["height"][i] = dec.width, dec.height
        cols["pixels"][i], cols["dec_width"][i], cols["dec_height"][i] = dec.pixels.tobytes(), w, h
    types = {"width": pa.int32(), "height": pa.int32(), "dec_width": pa.int32(),
             "dec_height": pa.int32(), "pixels": pa.large_binary()}
    out = batch
    for name, values in cols.items():
        out = out.append_column(name, pa.array(values, type=types.get(name, pa.string())))
    return out.append_column("read_retries", pa.array(retries, pa.int32()))


class ModelStage:
    """One model task over decoded batches: predict, encode to original pixels, append
    the task's column. A failing batch is retried image by image; only the images that
    still fail become error rows."""

    def __init__(self, cfg: TaskConfig, column_type: pa.DataType, drop_pixels: bool = False):
        torch.set_num_threads(max(1, cfg.torch_threads))
        if cfg.task == "embed":
            self.predictor = EmbeddingPredictor(cfg.arch, weights=cfg.weights, device=cfg.device,
                                                max_batch=cfg.batch_size)
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
                stage[i], etype[i], emsg[i] = self.task, type(e).__name__, _message(e)
        if images:
            outputs = predict_each(self.predictor, list(images.values()))
            width, height = batch.column("width"), batch.column("height")
            for (i, image), out in zip(images.items(), outputs, strict=True):
                if isinstance(out, Exception):
                    stage[i], etype[i], emsg[i] = self.task, type(out).__name__, _message(out)
                    continue
                w, h = width[i].as_py(), height[i].as_py()
                try:
                    values[i] = ENCODERS[self.task](
                        out, scale=(w / image.shape[1], h / image.shape[0]), width=w, height=h,
                        labels=self.labels)
                except Exception as e:
                    stage[i], etype[i], emsg[i] = "encode", type(e).__name__, _message(e)
        out_table = batch.drop_columns(list(ERROR_COLUMNS))
        if self.drop_pixels:
            out_table = out_table.drop_columns(list(PIXEL_COLUMNS))
        out_table = out_table.append_column(self.column, pa.array(values, type=self.column_type))
        for name, col in zip(ERROR_COLUMNS, (stage, etype, emsg), strict=True):
            out_table = out_table.append_column(name, pa.array(col, type=pa.string()))
        return out_table
