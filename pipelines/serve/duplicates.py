"""The near-duplicate groups a service answers `GET /images/{image_id}/duplicates` from.

Loaded once per snapshot (the index version and table version it serves), from the
table's DIR/dedup: its valid edges against the snapshot's table, restricted to images the
index holds (small: the graph grows with duplicates, not with the lake). A request is a
binary search and the members of one group. The nightly run commits the edges just after
it switches the index, so a snapshot may be taken between the two: the dedup table's
version is looked at again at most every `recheck_s` seconds (the service's reload
interval), never per request.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field

from models.errors import LakelensError
from pipelines import dedup
from pipelines.serve.engine import Snapshot

logger = logging.getLogger(__name__)

MAX_THRESHOLDS = 8  # groups kept per snapshot for thresholds other than the default


class NoDedupTable(LakelensError):
    """The service has no near-duplicate table to answer from (a 404)."""


@dataclass
class _Loaded:
    snap: weakref.ref
    version: int | None
    checked_at: float
    graph: dedup.DedupGraph
    groups: dict[float, dedup.Groups] = field(default_factory=dict)


class DuplicateGroups:
    """Per snapshot: the dedup graph, and its groups per threshold (cached)."""

    def __init__(self, recheck_s: float):
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None

    def groups(self, snap: Snapshot, threshold: float) -> dedup.Groups:
        """The groups at `threshold` of the snapshot's table. Raises NoDedupTable when the
        service has no table, or the table no DIR/dedup."""
        threshold = dedup.check_threshold(threshold, "threshold=")
        with self._lock:
            loaded = self._current(snap)
            found = loaded.groups.get(threshold)
            if found is None:
                if len(loaded.groups) >= MAX_THRESHOLDS:
                    loaded.groups.clear()
                found = loaded.groups[threshold] = loaded.graph.groups(threshold)
            return found

    def _current(self, snap: Snapshot) -> _Loaded:
        loaded, now = self._loaded, time.monotonic()
        same = loaded is not None and loaded.snap() is snap
        if same and (self.recheck_s <= 0 or now - loaded.checked_at < self.recheck_s):
            return loaded
        if snap.facets is None:
            raise NoDedupTable("this service has no annotations table (start it with --table DIR), "
                               "so no near-duplicates")
        table = snap.facets.table
        edges = dedup.open_edges(table.out)
        if edges is None:
            raise NoDedupTable(f"{table.out} has no near-duplicate table (DIR/dedup): `lakelens annotate "
                               "... --index INDEX_DIR` finds them")
        version = edges.version()
        if same and loaded.version == version:
            loaded.checked_at = now
            return loaded
        started = time.perf_counter()
        graph = dedup.load_graph(table, index=snap.index)
        self._loaded = _Loaded(weakref.ref(snap), version, now, graph)
        logger.info("near-duplicates: %d valid edges among %d images (dedup version %s, table "
                    "version %s) loaded in %.2f s", graph.edges, len(graph.node_id), version,
                    snap.table_version, time.perf_counter() - started)
        return self._loaded
