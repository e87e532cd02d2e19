"""`lakelens serve`: the similarity index as an HTTP service (see pipelines.serve.app)."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from models.errors import LakelensError
from pipelines.cluster.net import is_loopback
from pipelines.serve.engine import ServeConfig

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


def warn_if_open(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        print(f"lakelens: warning: serving on {host} with NO authentication: anyone who can reach "
              "this port can search the lake and read its images. Set a token with --token-file "
              "or LAKELENS_SERVE_TOKEN.", file=sys.stderr)


def serve(cfg: ServeConfig, *, token: str | None, engine=None) -> None:
    """Run the app under uvicorn on cfg.host:cfg.port until interrupted."""
    import uvicorn

    from pipelines.serve.app import CONFIG_ENV, TOKEN_ENV, create_app

    warn_if_open(cfg.host, token)
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
