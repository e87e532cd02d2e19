"""Device placement and mixed precision for inference."""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)


def pick_device(prefer: str | None = None) -> torch.device:
    """`prefer` ("cpu", "cuda", "cuda:1") if given, else CUDA when visible, else CPU.

    Under Ray, an actor started without `num_gpus` sees no GPU (CUDA_VISIBLE_DEVICES
    is empty), so this picks CPU there even on a GPU node.
    """
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs that support it, fp16 on older ones, nothing on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA (and CPU allocator) out-of-memory errors."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_memory(device: torch.device) -> None:
    """Give cached allocator blocks back after an OOM so a retry can fit."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
