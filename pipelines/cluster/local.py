"""A local Ray that listens on loopback only, with token authentication on.

A plain `ray.init()` opens about a dozen listening sockets, most on every interface
(GCS, raylet, workers, the metrics servers), and writes its token world-readable. A
single-machine Ray needs neither: Ray's own single-machine mode (the one it uses on
macOS/Windows, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`) takes 127.0.0.1 as the node
address, and every server then binds to it.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from pipelines.cluster import raycompat

logger = logging.getLogger(__name__)

SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def token_path() -> Path | None:
    """Where Ray reads its token from a file (None when it comes from RAY_AUTH_TOKEN)."""
    if os.environ.get(TOKEN_ENV):
        return None
    return Path(os.environ.get(TOKEN_PATH_ENV) or default_token_path())


def ensure_token() -> None:
    """Token auth on unless the user set RAY_AUTH_MODE; a token file readable by its owner only.

    A missing token is generated here (256 bits, as Ray does) rather than by Ray, which
    writes it 0644; an existing one of ours that others can read is narrowed to 0600.
    """
    if AUTH_MODE_ENV not in os.environ:  # explicit, so Ray prints no warning about it
        os.environ[AUTH_MODE_ENV] = "token"
        raycompat.reload_auth_mode()  # this process read RAY_AUTH_MODE when it imported Ray
    if os.environ[AUTH_MODE_ENV].lower() != "token":
        logger.warning("%s=%s: the local Ray runs without authentication",
                       AUTH_MODE_ENV, os.environ[AUTH_MODE_ENV])
        return
    path = token_path()
    if path is None:
        return
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        logger.info("generated a Ray auth token in %s (mode 0600)", path)
        raycompat.forget_cached_token()
    secure_file(path)


def secure_file(path: Path) -> None:
    """Make a secret file 0600 when it is ours and others can read it."""
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        path.chmod(0o600)
        logger.info("%s was readable by others: now 0600", path)


def bind_loopback() -> None:
    """Make this process (and the Ray processes it starts) take 127.0.0.1 as the node address."""
    os.environ[SINGLE_MACHINE_ENV] = "0"  # read by Ray's processes at import
    raycompat.use_loopback_node_address()  # this process imported Ray already


def start_local_ray(num_cpus: int | None = None, *, dashboard: bool = True, **kwargs) -> None:
    """A new local Ray instance on loopback with token auth (a `ray start` here is left alone).

    With `dashboard` (on 127.0.0.1, 8265 or the next free port) Ray's State API works, and
    the cluster's address is recorded where Ray's own processes look for it: Ray Train's
    placement-group cleaner asks the State API about its controller every few seconds
    and, without both, fills the terminal with "Failed to query ..." warnings.
    """
    import ray

    bind_loopback()
    ensure_token()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
             logging_level=logging.WARNING, **kwargs)
    if dashboard:
        _record_address(ray.get_runtime_context().gcs_address)


def _record_address(gcs_address: str) -> None:
    """Ray's "current cluster" file (as `ray start` writes it), removed again at exit
    when it still names this instance."""
    import atexit

    raycompat.write_current_cluster(gcs_address)

    def forget() -> None:
        try:
            if raycompat.read_current_cluster() == gcs_address:
                os.remove(raycompat.current_cluster_file())
        except OSError:
            pass

    atexit.register(forget)


# Lines Ray's own actors print to every driver that are about Ray, not the user's run.
RAY_NOISE = (
    "Actor with class name: 'PreemptionWatcher'",  # Ray Train's internal actor, each run
)


def filter_worker_logs(noise: tuple[str, ...] = RAY_NOISE) -> None:
    """Drop known Ray-internal lines from the worker output Ray forwards to this terminal
    (everything else still comes through; `-v` keeps them all)."""
    def wrap(handle):
        if getattr(handle, "lakelens_filtered", False):
            return handle

        def filtered(data: dict) -> None:
            lines = [line for line in data.get("lines", []) if not any(n in line for n in noise)]
            if lines:
                handle({**data, "lines": lines})

        filtered.lakelens_filtered = True
        return filtered

    raycompat.wrap_worker_log_handler("ray_print_logs", wrap)
