"""`lakelens index build|update`: index jobs over the lake table's current view.

build (build.py; on Ray in shards: sharded.py) streams the embeddings of the current view
at one table version into a new index version; update (update.py) reads the images the log
changed since the version the index saw and writes them as one new segment, retiring the
rows they replace; every annotate run syncs the index (sync), so a lagging one catches up.
Writers of one INDEX_DIR take its lock (a second is refused with one line).
"""

from pipelines.indexing.build import HELD_OUT_QUERIES, IndexBuildConfig, build, index_lock
from pipelines.indexing.update import MAX_DEAD_FRACTION, describe_update, rebuild_reason, sync, update

__all__ = ["HELD_OUT_QUERIES", "MAX_DEAD_FRACTION", "IndexBuildConfig", "build", "describe_update",
           "index_lock", "rebuild_reason", "sync", "update"]
