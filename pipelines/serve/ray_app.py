"""`lakelens serve --ray`: the same FastAPI app as a Ray Serve deployment.

Each replica opens the index (memory-mapped where FAISS can), its facets and the
embedder, and watches for new versions on its own; Ray Serve's proxy listens on
--host/--port (127.0.0.1 unless named) and scales replicas on ongoing requests.
"""

from __future__ import annotations

import logging

from pipelines.serve.app import create_app
from pipelines.serve.engine import ServeConfig

logger = logging.getLogger(__name__)

APP_NAME = "lakelens"
TARGET_ONGOING = 8  # requests per replica before the autoscaler adds one


def application(cfg: ServeConfig, *, token: str | None, min_replicas: int, max_replicas: int,
                replica_cpus: float):
    """The Ray Serve application (not yet running)."""
    from ray import serve

    app = create_app(cfg, token=token)

    @serve.deployment(
        name="lakelens-search",
        ray_actor_options={"num_cpus": replica_cpus},
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "initial_replicas": min_replicas,
                            "target_ongoing_requests": TARGET_ONGOING},
        max_ongoing_requests=4 * TARGET_ONGOING,
        health_check_period_s=10)
    @serve.ingress(app)
    class LakelensSearch:
        pass

    return LakelensSearch.bind()


def run(cfg: ServeConfig, *, token: str | None, min_replicas: int = 1, max_replicas: int = 4,
        replica_cpus: float = 1.0, blocking: bool = True) -> None:
    """Start Serve's proxy on cfg.host:cfg.port and deploy; blocks until interrupted."""
    from ray import serve

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(application(cfg, token=token, min_replicas=min_replicas, max_replicas=max_replicas,
                          replica_cpus=replica_cpus),
              name=APP_NAME, route_prefix="/", blocking=blocking)
