"""Weights specs and safe checkpoint I/O.

A weights spec is one of:
- ``default``: torchvision's published weights, fetched into the torch cache;
- ``random``: seeded initialisation (the same model everywhere; tests, smoke runs);
- a local path or URI to a checkpoint (``.pt``/``.pth`` loaded with
  ``torch.load(weights_only=True)``, or ``.safetensors``). Plain pickles that need code
  execution are refused.

A lakelens checkpoint is ``{"state_dict": {...}, "lakelens": {"arch": ..., "task": ...,
"labels": [...], "keypoint_names": [...], ...}}``; a bare state dict also loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from models.errors import LakelensError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI and job config import this module
    import torch

logger = logging.getLogger(__name__)

DEFAULT = "default"
RANDOM = "random"
RANDOM_SEED = 0
SPEC_CHOICES = (
    "'default' (torchvision's published weights), 'random' (seeded, for tests and smoke "
    "runs) or a path to a checkpoint (.pt, .pth or .safetensors)"
)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: tensors, lakelens metadata and a content id."""

    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    weights_id: str = ""


def is_path_spec(spec: str) -> bool:
    return spec not in (DEFAULT, RANDOM)


def validate_spec(spec: str, *, what: str = "weights") -> None:
    """Raise LakelensError unless `spec` is default, random or an existing checkpoint."""
    if not spec:
        raise LakelensError(f"{what}: empty weights spec; use {SPEC_CHOICES}")
    if not is_path_spec(spec):
        return
    if "://" in spec and not spec.startswith("file://"):
        return  # remote checkpoints are checked when read
    path = spec.removeprefix("file://")
    if not os.path.isfile(path):
        raise LakelensError(f"{what}: {spec!r} is not a file; a weights spec is {SPEC_CHOICES}")


@contextlib.contextmanager
def seeded(seed: int = RANDOM_SEED) -> Iterator[None]:
    """Seed torch's CPU RNG for a block without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _read_bytes(spec: str) -> bytes:
    if "://" in spec and not spec.startswith("file://"):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(spec)
        with fs.open_input_stream(path) as f:
            return f.read()
    with open(spec.removeprefix("file://"), "rb") as f:
        return f.read()


def _safetensors_meta(data: bytes) -> dict:
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    raw = header.get("__metadata__", {}).get("lakelens", "{}")
    return json.loads(raw)


def read_checkpoint(spec: str) -> Checkpoint:
    """Load a checkpoint safely (no code execution). Raises LakelensError when it cannot."""
    try:
        data = _read_bytes(spec)
    except OSError as e:
        raise LakelensError(f"cannot read checkpoint {spec!r}: {e}") from e
    weights_id = "sha256:" + hashlib.sha256(data).hexdigest()[:16]
    import torch

    if spec.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            return Checkpoint(load_safetensors(data), _safetensors_meta(data), weights_id)
        except Exception as e:  # safetensors raises its own error types
            raise LakelensError(f"checkpoint {spec!r} is not a valid safetensors file: {e}") from e
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise LakelensError(
            f"checkpoint {spec!r} refused: it is a pickle that needs code execution to load "
            "(only tensors and plain containers are accepted; re-save it as a state dict)"
        ) from e
    except Exception as e:
        raise LakelensError(f"checkpoint {spec!r} could not be loaded: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return Checkpoint(obj["state_dict"], dict(obj.get("lakelens") or {}), weights_id)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return Checkpoint(obj, {}, weights_id)
    raise LakelensError(
        f"checkpoint {spec!r} holds neither a state dict nor a lakelens checkpoint"
    )


def read_for(spec: str, *, task: str, arch: str) -> Checkpoint:
    """read_checkpoint, refusing one that says it was written for another arch."""
    ckpt = read_checkpoint(spec)
    written_for = ckpt.meta.get("arch", arch)
    if written_for != arch:
        raise LakelensError(f"checkpoint {spec!r} is for {task} arch {written_for!r}, not {arch!r}; "
                            f"pass --arch {task}={written_for}")
    return ckpt


def load_into(model: torch.nn.Module, ckpt: Checkpoint, *, spec: str, arch: str) -> None:
    """Load every tensor strictly; a mismatch is a LakelensError naming the first problem."""
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise LakelensError(f"checkpoint {spec!r} does not fit arch {arch!r}: {first}") from e


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a lakelens checkpoint atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    import torch

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    torch.save({"state_dict": tensors, "lakelens": meta}, tmp)
    os.replace(tmp, path)


def cache_path(name: str) -> Path:
    """Where torch keeps (and torchvision looks for) a published weights file."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / name


def cache_file(url: str) -> Path:
    return cache_path(os.path.basename(urlparse(url).path))


def install_cached(name: str, data: bytes) -> Path:
    """Put published weights a driver shipped into this machine's torch cache, so a worker
    node loads `default` with no internet. torchvision still checks the sha256 prefix in
    the file name when it loads them."""
    if os.path.basename(name) != name or not name.endswith((".pth", ".pt")):
        raise ValueError(f"not a torch cache file name: {name!r}")
    path = cache_path(name)
    if path.is_file() and path.stat().st_size == len(data):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    logger.info("installed shipped weights %s (%.1f MiB)", path, len(data) / 2**20)
    return path


def ensure_default_available(url: str, *, what: str) -> None:
    """Make sure torchvision's published weights at `url` are in the torch cache.

    Downloads them when the machine can; otherwise raises one clear LakelensError.
    """
    cached = cache_file(url)
    if cached.is_file():
        return
    logger.info("downloading %s weights from %s", what, url)
    import torch

    try:
        torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True, weights_only=True)
    except Exception as e:
        raise LakelensError(
            f"{what}: weights 'default' are not in the torch cache ({cached}) and could not "
            f"be downloaded ({type(e).__name__}); use --weights random, or --weights "
            f"TASK=/path/to/checkpoint.pt"
        ) from e
