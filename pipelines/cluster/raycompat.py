"""The only module of lakelens that touches Ray's private APIs (`ray._raylet`, `ray._private`).

Each use is one small function here, because Ray has no public way to do it; a Ray
upgrade that moves a symbol breaks tests/test_raycompat.py by name first. What each
gives, and what breaks when it moves:

- `reload_auth_mode` (`ray._raylet.Config.initialize`): Ray reads RAY_AUTH_MODE once, when
  it is imported; a process that turns token auth on afterwards must make it read the
  environment again. Without it, the local Ray lakelens starts runs without a token.
- `forget_cached_token` (`ray._raylet.AuthenticationTokenLoader`): the loader caches the
  token (or its absence); after lakelens writes a new token file Ray must read it again,
  else the first local start fails its own authentication.
- `use_loopback_node_address` (`ray._private.ray_constants.ENABLE_RAY_CLUSTER`): the
  single-machine switch (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) is read at import too; in
  this process the constant is flipped by hand. Without it the local Ray binds to every
  interface (tests/test_security.py notices).
- `package_walk` (`ray._private.runtime_env.packaging._dir_travel`, `_get_excludes`): the
  files Ray's own working_dir packaging takes, with its rules for excludes, .gitignore and
  .rayignore (gitignore syntax, nested files). lakelens zips exactly that list itself;
  without it `lakelens submit` cannot tell what a directory would upload.
- `write_current_cluster`, `read_current_cluster`, `current_cluster_file`
  (`ray._private.utils.write_ray_address`, `read_ray_address`, and
  `ray._common.utils.get_ray_address_file`): the "current cluster" file that `ray start`
  writes and Ray's own processes read (Ray Train's cleaner asks the State API through it).
  Without it a laptop run's Train job logs "Failed to query ..." warnings.
- `wrap_worker_log_handler` (`ray._private.ray_logging.global_worker_stdstream_dispatcher`):
  the dispatcher of the worker output Ray forwards to the driver's terminal; lakelens
  drops known Ray-internal lines. Cosmetic: without it those lines come through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# module.attribute for every private symbol below (tests/test_raycompat.py looks each up)
PRIVATE_SYMBOLS = (
    "ray._raylet.Config",
    "ray._raylet.AuthenticationTokenLoader",
    "ray._private.ray_constants.ENABLE_RAY_CLUSTER",
    "ray._private.runtime_env.packaging._dir_travel",
    "ray._private.runtime_env.packaging._get_excludes",
    "ray._private.utils.write_ray_address",
    "ray._private.utils.read_ray_address",
    "ray._common.utils.get_ray_address_file",
    "ray._private.ray_logging.global_worker_stdstream_dispatcher",
)

Handler = Callable[[dict], None]


def reload_auth_mode() -> None:
    """Make this process's Ray read RAY_AUTH_MODE (and its other settings) again."""
    from ray._raylet import Config

    Config.initialize("")


def forget_cached_token() -> None:
    """Make Ray read its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) again."""
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()


def use_loopback_node_address() -> None:
    """Make Ray in this process take 127.0.0.1 as the node address (its single-machine mode;
    the environment variable covers the processes it starts)."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def package_walk(root: Path, excludes: Sequence[str], *, skip: Callable[[Path], bool] | None = None,
                 include_gitignore: bool = True) -> list[Path]:
    """Every file under `root` that Ray's working_dir packaging would take: not matched by
    `excludes` (gitignore syntax, relative to root), by a .rayignore, or (with
    `include_gitignore`) by a .gitignore on the way down, nor under a path `skip` rejects.
    Excluded directories are not entered."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: list[Path] = []

    def visit(path: Path) -> None:
        if path.is_file():
            files.append(path)

    matchers: list[Callable[[Path], bool]] = [_get_excludes(root, list(excludes))]
    if skip is not None:
        matchers.append(skip)
    quiet = logging.getLogger(f"{__name__}.walk")  # Ray logs each ignore file it honours
    quiet.setLevel(logging.WARNING)
    _dir_travel(root, matchers, visit, include_gitignore=include_gitignore, logger=quiet)
    return files


def current_cluster_file(temp_dir: str | None = None) -> str:
    """Where Ray keeps the current cluster's GCS address (under /tmp/ray by default)."""
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(temp_dir)


def write_current_cluster(gcs_address: str, temp_dir: str | None = None) -> None:
    from ray._private.utils import write_ray_address

    write_ray_address(gcs_address, temp_dir)


def read_current_cluster(temp_dir: str | None = None) -> str | None:
    from ray._private.utils import read_ray_address

    return read_ray_address(temp_dir)


def wrap_worker_log_handler(name: str, wrap: Callable[[Handler], Handler]) -> bool:
    """Replace the forwarded-worker-output handler `name` with `wrap(handler)`; False when
    there is no such handler (or Ray moved the dispatcher: then the output is unfiltered)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError as e:
        logger.debug("no worker output dispatcher in this Ray: %s", e)
        return False
    with dispatcher._lock:
        handlers = [handle for key, handle in dispatcher.handlers if key == name]
    if not handlers:
        return False
    dispatcher.remove_handler(name)
    for handle in handlers:
        dispatcher.add_handler(name, wrap(handle))
    return True
