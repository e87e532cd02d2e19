"""`lakelens serve`: the similarity index as an HTTP service (see pipelines.serve.app).

Who may ask: on loopback, anyone on this machine unless a token is given. Beyond loopback
a token is required: the user's (--token-file, LAKELENS_SERVE_TOKEN), else one generated
here, as Jupyter does (256 random bits in a 0600 file of a 0700 directory, removed when
the service stops; the URL carrying it printed once to stderr, never logged). Only
--no-auth serves the lake open beyond loopback, with a warning.
"""

from __future__ import annotations

import os

# Before anything loads FAISS (its OpenMP runtime reads this once, when it loads): the
# search thread's OpenMP workers sleep between calls instead of spinning for ~1 ms after
# each one, which on a small machine took the cores the event loop needs (server CPU per
# query at concurrency 8 fell ~6x). index/store.py imports faiss before index/build.py
# sets the same default, so the service cannot rely on that one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import logging  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

from models.errors import LakelensError  # noqa: E402
from pipelines.cluster.net import is_loopback  # noqa: E402
from pipelines.serve.engine import ServeConfig  # noqa: E402

logger = logging.getLogger(__name__)


def read_token(token_file: str | None) -> str | None:
    """The access token: --token-file's first line, else $LAKELENS_SERVE_TOKEN (never a
    command-line argument: those show in `ps` and shell history)."""
    from pipelines.serve.app import TOKEN_ENV

    if token_file:
        try:
            token = Path(token_file).read_text().strip().splitlines()[0].strip()
        except (OSError, IndexError) as e:
            raise LakelensError(f"cannot read a token from --token-file {token_file!r}: "
                                f"{type(e).__name__}") from e
        if len(token) < 16:
            raise LakelensError(f"the token in {token_file!r} is {len(token)} characters; use at least 16")
        return token
    return os.environ.get(TOKEN_ENV) or None


def check_auth_flags(token: str | None, *, no_auth: bool) -> None:
    """Raises LakelensError when --no-auth comes with a token."""
    if no_auth and token:
        raise LakelensError("--no-auth contradicts the token given by --token-file or "
                            "LAKELENS_SERVE_TOKEN: drop one of them")


def warn_if_open(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        print(f"lakelens: warning: serving on {host} with NO authentication (--no-auth): anyone "
              "who can reach this port can search the lake and read its images.", file=sys.stderr)


def token_dir() -> Path:
    """Where generated tokens go: $XDG_RUNTIME_DIR/lakelens (a per-user tmpfs, emptied at
    logout), else $XDG_STATE_HOME/lakelens (default ~/.local/state/lakelens)."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "lakelens"
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "lakelens"


def write_token_file(directory: Path, name: str) -> tuple[str, Path]:
    """A new token (256 random bits, hex) in directory/name, created 0600 with O_EXCL (a
    stale file of that name is removed first) in a directory of ours made or narrowed to
    0700. Returns the token and the file. Raises LakelensError when the directory is
    another user's."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = directory.stat()
    if st.st_uid != os.getuid():
        raise LakelensError(f"{directory} belongs to another user: cannot keep a token there")
    if st.st_mode & 0o077:
        directory.chmod(0o700)
    path = directory / name
    token = secrets.token_hex(32)
    path.unlink(missing_ok=True)  # only we can write here: a file of this name is a stale one of ours
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, path


def token_url(cfg: ServeConfig, token: str) -> str:
    """The page's URL carrying the token: --public-url's, else http://HOST:PORT (this
    machine's name for a wildcard bind)."""
    if cfg.public_url:
        return f"{cfg.public_url.rstrip('/')}/?token={token}"
    host = socket.gethostname() if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{cfg.port}/?token={token}"


@contextmanager
def access_token(cfg: ServeConfig, token: str | None, *, no_auth: bool = False) -> Iterator[str | None]:
    """The token the service requires while the block runs: `token` when given; beyond
    loopback without one (and without `no_auth`), a generated one (see the module doc),
    its file removed on exit; else None (open; warns beyond loopback)."""
    check_auth_flags(token, no_auth=no_auth)
    if token or no_auth or is_loopback(cfg.host):
        warn_if_open(cfg.host, token)
        yield token
        return
    token, path = write_token_file(token_dir(), f"serve-{cfg.port}-{os.getpid()}.token")
    print(f"lakelens: no token was given for {cfg.host}: generated one in {path} (mode 0600, removed "
          f"on exit). Open:\n    {token_url(cfg, token)}", file=sys.stderr, flush=True)
    try:
        with _exit_on_sigterm():
            yield token
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """SIGTERM raises SystemExit while the block runs, so that `finally` clauses run: uvicorn
    re-raises the SIGTERM it caught once it has stopped, which by default kills the process."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def leave(signum: int, _frame) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def serve(cfg: ServeConfig, *, token: str | None, engine=None, no_auth: bool = False) -> None:
    """Run the app under uvicorn on cfg.host:cfg.port until interrupted, requiring the
    token `access_token` decides (every worker process the same one)."""
    with access_token(cfg, token, no_auth=no_auth) as required:
        _run(cfg, required, engine)


def _run(cfg: ServeConfig, token: str | None, engine) -> None:
    import uvicorn

    from pipelines.serve.app import CONFIG_ENV, TOKEN_ENV, create_app

    if cfg.workers == 1:
        uvicorn.run(create_app(cfg, token=token, engine=engine), host=cfg.host, port=cfg.port,
                    log_level="warning", access_log=False)
        return
    # worker processes build the app themselves from the environment (one index each;
    # memory-mapped indexes share their pages)
    os.environ[CONFIG_ENV] = json.dumps(asdict(cfg))
    if token:
        os.environ[TOKEN_ENV] = token
    uvicorn.run("pipelines.serve.app:app_from_env", factory=True, host=cfg.host, port=cfg.port,
                workers=cfg.workers, log_level="warning", access_log=False)
