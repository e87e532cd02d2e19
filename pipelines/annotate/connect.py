"""Joining Ray for a job: `--address` (or RAY_ADDRESS, or the job's cluster), else a new
local Ray. Imports no torch: the CLI starts Ray here while the job's modules (torch,
torchvision) import in a background thread, so a run's first seconds are not spent
waiting on one and then the other."""

from __future__ import annotations

import logging
import os
import socket
import warnings

import ray

from models.errors import LakelensError
from pipelines.cluster.local import filter_worker_logs, start_local_ray
from pipelines.config import AnnotateConfig  # or any config with .address and .num_cpus

logger = logging.getLogger(__name__)


def connect(cfg: AnnotateConfig) -> None:
    """Join `--address` (or RAY_ADDRESS, or the job's cluster); else start a local Ray.
    Call it from the main thread: a local Ray's processes are tied to the thread that
    started them (they die with it) and Ray's SIGTERM handler needs the main thread."""
    if not ray.is_initialized():
        _init(cfg)
    if not logger.isEnabledFor(logging.DEBUG):  # lakelens logs its own progress per chunk
        from ray.data import DataContext  # after ray.init: Ray's processes start meanwhile

        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        # A small run gives the model pool fewer blocks than actors: normal, not a problem.
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")


def _init(cfg: AnnotateConfig) -> None:
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # a new instance even when `ray start` runs on this machine (joining that one
            # takes --address), bound to loopback, token auth on
            start_local_ray(cfg.num_cpus)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise LakelensError(f"cannot connect to Ray at {address or 'a new local instance'}: {e}") from e
    if not logger.isEnabledFor(logging.DEBUG):
        filter_worker_logs()


def _check_reachable(address: str) -> None:
    """Fail in seconds on a HOST:PORT nothing listens on (ray.init retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        return  # "auto", "local": Ray resolves those itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as e:
        raise LakelensError(f"cannot connect to Ray at {address}: {e.strerror or e}") from e
