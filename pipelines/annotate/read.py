"""The read stage: bytes -> hash -> decoded pixels, one row per image, errors as rows.

It imports no torch: Ray starts many small read workers (fractions of a CPU each), and
each would otherwise pay torch's import (~3 s of CPU) before reading its first image.
"""

from __future__ import annotations

import os
import time

import pyarrow as pa

from models.decode import FileTooLargeError, content_hash, decode_image
from pipelines.lake.sources import read_bytes

ERROR_COLUMNS = ("error_stage", "error_type", "error_message")
PIXEL_COLUMNS = ("pixels", "dec_width", "dec_height")
MAX_MESSAGE = 500
READ_ATTEMPTS = 3
READ_BACKOFF_S = 0.5  # doubled after each failed attempt
TRANSIENT_HINTS = ("timed out", "timeout", "connection reset", "connection aborted", "throttl",
                   "slowdown", "slow down", "slow_down", "reduce your request rate",
                   "too many requests", "service unavailable",
                   "internal error", " 500", " 502", " 503", " 504", "temporarily")


def is_transient(exc: BaseException) -> bool:
    """Timeouts, connection resets, 5xx and throttling: worth another try."""
    if isinstance(exc, TimeoutError | ConnectionError | InterruptedError):
        return True
    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | FileTooLargeError):
        return False
    text = str(exc).lower()
    return any(h in text for h in TRANSIENT_HINTS)


def read_with_retries(uri: str, *, max_bytes: int | None = None, attempts: int = READ_ATTEMPTS,
                      backoff_s: float = READ_BACKOFF_S) -> tuple[bytes, int]:
    """The object's bytes and how many transient failures were retried on the way; an
    object over `max_bytes` is a FileTooLargeError, found before its bytes are read."""
    for attempt in range(attempts):
        try:
            return read_bytes(uri, max_bytes=max_bytes), attempt
        except Exception as e:
            if attempt + 1 == attempts or not is_transient(e):
                raise
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def error_message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:MAX_MESSAGE]


def read_decode(batch: pa.Table, *, max_pixels: int, short: int | None,
                long: int | None, max_bytes: int | None = None) -> pa.Table:
    """(image_id, uri, ...) -> + content_hash, width, height, pixels, dec_*, read_retries and
    error columns; the input columns pass through. An object over `max_bytes` is a read
    error row (FileTooLargeError); a disallowed format or too many pixels a decode one."""
    n = batch.num_rows
    cols: dict[str, list] = {k: [None] * n for k in (
        "content_hash", "width", "height", "pixels", "dec_width", "dec_height") + ERROR_COLUMNS}
    retries = [0] * n
    for i, uri in enumerate(batch.column("uri").to_pylist()):
        try:
            data, retries[i] = read_with_retries(uri, max_bytes=max_bytes)
        except Exception as e:  # missing, broken symlink, permission, network, over the byte cap
            cols["error_stage"][i], cols["error_type"][i] = "read", type(e).__name__
            cols["error_message"][i] = error_message(e)
            continue
        cols["content_hash"][i] = content_hash(data)
        try:
            dec = decode_image(data, max_pixels=max_pixels, short=short, long=long)
        except Exception as e:  # DecodeError subclasses, MemoryError, PIL internals
            cols["error_stage"][i], cols["error_type"][i] = "decode", type(e).__name__
            cols["error_message"][i] = error_message(e)
            continue
        h, w = dec.pixels.shape[:2]
        cols["width"][i], cols["height"][i] = dec.width, dec.height
        cols["pixels"][i], cols["dec_width"][i], cols["dec_height"][i] = dec.pixels.tobytes(), w, h
    types = {"width": pa.int32(), "height": pa.int32(), "dec_width": pa.int32(),
             "dec_height": pa.int32(), "pixels": pa.large_binary()}
    out = batch
    for name, values in cols.items():
        out = out.append_column(name, pa.array(values, type=types.get(name, pa.string())))
    out = out.append_column("read_retries", pa.array(retries, pa.int32()))
    # The node that decoded (its raylet's pid, as ActorStats names nodes): placement checks.
    return out.append_column("decoded_on", pa.array([os.environ.get("RAY_RAYLET_PID")] * n, pa.string()))
