"""Shared fixtures: one local Ray per module, gpu/slow markers, seeded RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

TINY_ARCHS = {"detect": "fasterrcnn_tiny", "segment": "maskrcnn_tiny",
              "pose": "keypointrcnn_tiny", "embed": "tiny"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with 2 CPUs, shared by a module (ray.init takes ~5 s).

    Token auth is disabled for this loopback-only test cluster so that no test depends
    on (or writes) a token in the home directory.
    """
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
