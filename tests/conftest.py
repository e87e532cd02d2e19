"""Shared fixtures: one local Ray per module, gpu/slow markers, seeded RNG."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile

import numpy as np
import pytest
import torch

TINY_ARCHS = {"detect": "fasterrcnn_tiny", "segment": "maskrcnn_tiny",
              "pose": "keypointrcnn_tiny", "embed": "tiny"}


_TOKEN_DIR = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Ray token auth ON for every Ray the tests start, with a token of the test run's own.

    Set before any test module imports Ray (Ray reads RAY_AUTH_MODE at import): no test
    depends on, or writes, a token in the home directory.
    """
    token_dir = tempfile.mkdtemp(prefix="lakelens-test-token-")
    path = os.path.join(token_dir, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.pop("RAY_ADDRESS", None)
    config.stash[_TOKEN_DIR] = token_dir


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run's token goes with the run (no secret left behind in /tmp)."""
    token_dir = config.stash.get(_TOKEN_DIR, None)
    if token_dir:
        shutil.rmtree(token_dir, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with 2 CPUs, shared by a module (ray.init takes ~5 s): lakelens's
    own local start, so on loopback with token auth on."""
    import ray

    from pipelines.cluster.local import start_local_ray

    start_local_ray(2, dashboard=False)  # the dashboard only serves people and Ray Train's cleaner
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
