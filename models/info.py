"""What a built model says about itself, and the one error for an unknown arch.

The builders (detection, embedding, semantic) import this module and never the
registry; the registry imports the builders (lazily, for their arch tables). Imports
no torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from models.errors import LakelensError


@dataclass(frozen=True)
class ModelInfo:
    """What made a column: task, arch, weights and the label vocabulary."""

    task: str
    arch: str
    weights: str  # the spec as given: default, random or a path
    weights_id: str  # default:<torchvision enum>, random:seed<N>, or sha256:<hash>
    labels: tuple[str, ...] = ()  # index = label id
    keypoint_names: tuple[str, ...] = ()
    embedding_dim: int | None = None
    input_size: tuple[int, int] | None = None  # detect/semantic: (shorter, longer) side they resize to


def check_arch_in(task: str, arch: str, choices: Iterable[str]) -> None:
    """Raise LakelensError naming the valid archs when `arch` is not one of `choices`."""
    names = sorted(choices)
    if arch not in names:
        raise LakelensError(f"unknown {task} arch {arch!r}; choose from {', '.join(names)}")
