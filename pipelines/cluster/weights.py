"""`default` weights for nodes without internet: resolved once by the driver, shipped
through the object store, installed into each node's torch cache by the actors/workers."""

from __future__ import annotations

import logging
import os

import ray

from models import weights as W

logger = logging.getLogger(__name__)


def joined_cluster(address: str | None) -> bool:
    """Joined a cluster (which may add nodes later) rather than started a local Ray."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def ship_published(urls: set[str], *, joined: bool) -> dict[str, ray.ObjectRef] | None:
    """{torch cache file name: ObjectRef of its bytes} for the published weights at `urls`
    (already in the driver's cache). None on one machine, where everyone reads the
    driver's cache."""
    if not urls or (not joined and len([n for n in ray.nodes() if n["Alive"]]) < 2):
        return None
    shipped = {}
    for url in sorted(urls):
        path = W.cache_file(url)
        shipped[path.name] = ray.put(path.read_bytes())
        logger.info("shipping %s (%.1f MiB) to the workers", path.name, path.stat().st_size / 2**20)
    return shipped


def install_shipped(weights_files: dict | None) -> None:
    """Shipped weights into this node's torch cache, fetched only where the cache lacks them."""
    for name, ref in (weights_files or {}).items():
        if not W.cache_path(name).is_file():
            W.install_cached(name, ray.get(ref))
