"""Tasks, their default architectures, and what a built model says about itself.

The registry looks the builders' arch tables up lazily (they import torch); the builders
import `models.info`, never this module, so the dependency points one way.
"""

from __future__ import annotations

from models.errors import LakelensError
from models.info import ModelInfo as ModelInfo  # re-exported: what a built model says about itself
from models.info import check_arch_in

TASKS: tuple[str, ...] = ("detect", "segment", "pose", "semantic", "embed")
# what `annotate` runs when --tasks is not given: semantic segmentation is asked for by name
DEFAULT_TASKS: tuple[str, ...] = ("detect", "segment", "pose", "embed")
# metric-learning losses (models.metric), named here so the CLI needs no torch to list them
LOSSES: tuple[str, ...] = ("multi_similarity", "contrastive", "triplet_margin", "proxy_anchor", "arcface")

DEFAULT_ARCHS: dict[str, str] = {
    "detect": "fasterrcnn_resnet50_fpn_v2",
    "segment": "maskrcnn_resnet50_fpn_v2",
    "pose": "keypointrcnn_resnet50_fpn",
    "semantic": "deeplabv3_resnet50",
    "embed": "resnet50",
}


# The architectures each task's builder knows, by name: checking `--arch` (the CLI, a job's
# config) needs no torch import (seconds). tests/test_models.py holds these equal to the
# builders' own registries (DETECTION_ARCHS, SEMANTIC_ARCHS, EMBED_ARCHS).
ARCH_NAMES: dict[str, tuple[str, ...]] = {
    "detect": ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
               "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_tiny",
               "fcos_resnet50_fpn", "retinanet_resnet50_fpn_v2", "ssd300_vgg16",
               "ssdlite320_mobilenet_v3_large"),
    "segment": ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "maskrcnn_tiny"),
    "pose": ("keypointrcnn_resnet50_fpn", "keypointrcnn_tiny"),
    "semantic": ("deeplabv3_mobilenet_v3_large", "deeplabv3_resnet101", "deeplabv3_resnet50",
                 "deeplabv3_tiny", "fcn_resnet50", "lraspp_mobilenet_v3_large", "unet_tiny"),
    "embed": ("resnet18", "resnet50", "tiny"),
}


def arch_choices(task: str) -> list[str]:
    """The architectures `--arch TASK=NAME` accepts for `task`."""
    check_task(task)
    return sorted(ARCH_NAMES[task])


def check_task(task: str) -> None:
    if task not in TASKS:
        raise LakelensError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def check_arch(task: str, arch: str) -> None:
    check_arch_in(task, arch, arch_choices(task))


def published_url(task: str, arch: str) -> str | None:
    """The URL of torchvision's published weights for this arch (None: it has none)."""
    if task == "embed":
        from models.embedding import EMBED_ARCHS

        published = EMBED_ARCHS[arch].published
    elif task == "semantic":
        from models.semantic import SEMANTIC_ARCHS

        published = SEMANTIC_ARCHS[arch].published
    else:
        from models.detection import DETECTION_ARCHS

        published = DETECTION_ARCHS[arch].published
    return None if published is None else published.url


def ensure_default_weights(task: str, arch: str, *, flag: str) -> str:
    """Check, in the driver, that `default` weights exist for this arch and are in the
    torch cache (downloading when possible); else one line naming what to pass instead.
    flag: how the user names weights, e.g. "--weights detect=" or "--init "."""
    url = published_url(task, arch)
    if url is None:
        raise LakelensError(f"{task} arch {arch!r} has no published weights; use {flag}random or "
                            f"{flag}/path/to/checkpoint.pt")
    from models import weights as W  # imports torch: only where weights are checked

    W.ensure_default_available(url, what=f"{task} ({arch})")
    return url
