"""The service's state: one opened index version, its facets and the embedder, swapped
whole when the nightly run switches in a new version.

A request takes the current Snapshot once and uses only it: a reload builds the next
snapshot beside it and swaps one reference under a lock, so requests in flight finish on
the old version (freed when the last one lets go) and none fails.

The watcher reads INDEX_DIR/CURRENT (one small file) every reload interval and nothing
else: a chunk commit to the table does not reload anything; a new index version does.
When that version is an update of the one served (rows appended, replaced ones dead),
its facets are the served ones plus the table's changes since (Facets.updated), not a
new scan of the lake. A request's filter is evaluated in the request's own thread; the
one search thread only runs FAISS.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from types import EllipsisType

import numpy as np

from index import store
from index.embed import weights_spec
from index.store import Neighbors, SimilarityIndex
from models.decode import decode_image, probe_image
from models.embedding import decode_sizes as embed_decode_sizes
from models.errors import LakelensError
from pipelines.lake.table import open_table
from pipelines.serve.facets import Facets, Filter

logger = logging.getLogger(__name__)

# FAISS time per query (on one core) above which the search thread takes every core: an
# event loop spends ~0.1-0.2 ms of CPU per request, so beside queries that cost more than
# this its core is mostly idle (exact search of 50k vectors: ~2 ms; the 1M `auto` index:
# ~0.3 ms, where one thread fewer than the cores answered ~25 % more queries on 2 cores)
HEAVY_QUERY_S = 0.001


@dataclass(frozen=True)
class ServeConfig:
    index: str
    table: str | None = None  # default: the table the index was built from
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    reload_s: float = 10.0  # how often to read CURRENT for a new index version (0: never)
    max_k: int = 1000
    max_body_mb: float = 32.0
    max_pixels: int = 50_000_000
    max_images: int = 16  # per upload request
    max_request_pixels: int = 100_000_000  # an upload request's images together, from their headers
    weights: str | None = None  # the embedder's checkpoint when the index names one
    public_url: str | None = None  # where people reach it (a TLS proxy): https makes the cookie Secure

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise LakelensError(f"--workers must be >= 1, got {self.workers}")
        if not 0 < self.port < 65536:
            raise LakelensError(f"--port must be in 1..65535, got {self.port}")
        if self.max_k < 1:
            raise LakelensError(f"--max-k must be >= 1, got {self.max_k}")
        if self.reload_s < 0:
            raise LakelensError(f"--reload-interval must be >= 0, got {self.reload_s}")
        if self.max_request_pixels < 1:
            raise LakelensError(f"--max-request-pixels must be >= 1, got {self.max_request_pixels}")
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise LakelensError(f"--public-url must be an http:// or https:// URL, got {self.public_url!r}")


class PixelBudgetError(LakelensError):
    """An upload request whose images hold more pixels together than --max-request-pixels
    (the service answers 413)."""


@dataclass
class Snapshot:
    """One index version and what goes with it; never changed once built."""

    index: SimilarityIndex
    facets: Facets | None
    version: str
    table_version: int | None
    loaded_at: float = field(default_factory=time.time)

    def select(self, flt: Filter) -> np.ndarray | None:
        """The index rows the filter allows (sorted int64), None for no filter; costs what
        the filter matches (Facets.select)."""
        if flt.is_empty():
            return None
        if self.facets is None:
            raise LakelensError("filters need the annotations table; start the service with --table")
        return self.facets.select(flt)

    def search(self, vectors: np.ndarray, k: int, flt: Filter,
               nprobe: int | None) -> tuple[Neighbors, int | None]:
        return self.search_rows(vectors, k, self.select(flt), nprobe)

    def search_rows(self, vectors: np.ndarray, k: int, rows: np.ndarray | None,
                    nprobe: int | None) -> tuple[Neighbors, int | None]:
        """Search among `rows` (select's answer; None: every live row). Returns the hits and
        how many rows the filter allowed (None without one)."""
        found = self.index.search(vectors, k, allow=rows, nprobe=nprobe)
        return found, None if rows is None else int(self.index.live[rows].sum())

    def browse(self, flt: Filter, offset: int, limit: int) -> tuple[int, list[str], list[str]]:
        """The live index rows that pass `flt`, in row order (all live rows when it sets no
        condition): (how many pass, image_ids and uris of the passing rows offset..offset+limit)."""
        if flt.is_empty():
            keep = self.index.live
            total, rows = int(np.count_nonzero(keep)), _true_rows(keep, offset, limit)
        elif self.facets is None:
            raise LakelensError("filters need the annotations table; start the service with --table")
        else:  # the posting lists' rows: what the filter matches, never a scan of the index
            matched = self.facets.select(flt)
            matched = matched[self.index.live[matched]]
            total, rows = len(matched), matched[offset:offset + limit]
        ids = self.index.ids
        return total, ids.image_ids.take(rows).to_pylist(), ids.uris.take(rows).to_pylist()


class Batcher:
    """Greedy batching of concurrent searches. One thread runs FAISS; whatever queries
    queued while it was busy go into its next call, one call per group sharing
    (snapshot, k, filter, nprobe). Nothing waits for a batch to fill: a lone query runs at
    once. FAISS answers a batch far faster per query than one query at a time (its IVF
    scan and re-ranking work over many queries together, on every core)."""

    def __init__(self, max_batch: int = 64):
        import queue

        self.max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.calls = self.queries = 0
        # OpenMP threads of the search thread's FAISS calls while queries are light (None:
        # as set; heavy ones, see HEAVY_QUERY_S, take them all)
        self.threads: int | None = None
        self._using = 1  # threads of the last FAISS call
        self._cost = 0.0  # FAISS seconds per query on one core, a moving average

    def submit(self, snap: Snapshot, vectors: np.ndarray, k: int, flt: Filter, nprobe: int | None,
               *, rows: np.ndarray | None | EllipsisType = ...):
        """A concurrent.futures.Future of (Neighbors, allowed) for these queries. `rows`:
        snap.select(flt) if the caller has it; else it is evaluated here, in the caller's
        thread (never in the search thread, where it would hold up every search)."""
        from concurrent.futures import Future

        future: Future = Future()
        self._put(snap, vectors, k, flt, nprobe, rows, future)
        return future

    def submit_async(self, snap: Snapshot, vectors: np.ndarray, k: int, flt: Filter,
                     nprobe: int | None, *, rows: np.ndarray | None | EllipsisType = ...):
        """As submit, for a caller in an event loop: an asyncio.Future of that loop. The
        answers of one FAISS call reach each loop in one call_soon_threadsafe (one wake-up
        of the loop per batch, not one per request)."""
        import asyncio

        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._put(snap, vectors, k, flt, nprobe, rows, (loop, future))
        return future

    def _put(self, snap: Snapshot, vectors: np.ndarray, k: int, flt: Filter, nprobe: int | None,
             rows: np.ndarray | None | EllipsisType, waiter) -> None:
        if rows is ...:
            rows = snap.select(flt)
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="lakelens-search",
                                                    daemon=True)
                    self._thread.start()
        self._queue.put(((id(snap), k, flt, nprobe), snap, vectors, waiter, rows))

    def _run(self) -> None:
        import queue

        import faiss

        every = faiss.omp_get_max_threads()
        self._using = every
        while True:
            items = [self._queue.get()]
            if self.threads is not None:
                want = every if self._cost > HEAVY_QUERY_S else min(self.threads, every)
                if want != self._using:
                    faiss.omp_set_num_threads(want)  # this thread's own setting, no one else's
                    self._using = want
            queued = len(items[0][2])
            while queued < self.max_batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
                queued += len(items[-1][2])
            groups: dict = {}
            for item in items:
                groups.setdefault(item[0], []).append(item)
            for (_, k, flt, nprobe), group in groups.items():
                self._answer(group, k, flt, nprobe)

    def _answer(self, group: list, k: int, flt: Filter, nprobe: int | None) -> None:
        snap = group[0][1]
        started = time.perf_counter()
        try:
            vectors = np.concatenate([g[2] for g in group])
            # one group shares the snapshot and the filter: its rows are the same
            found, allowed = snap.search_rows(vectors, k, group[0][4], nprobe)
        except Exception as e:  # each waiting request gets the error (a 4xx or a 500)
            _deliver([(g[3], None, e) for g in group])
            return
        cost = (time.perf_counter() - started) * self._using / len(vectors)
        self._cost += 0.2 * (cost - self._cost)
        self.calls += 1
        self.queries += sum(len(g[2]) for g in group)
        at, answers = 0, []
        for g in group:
            n = len(g[2])
            part = Neighbors(found.scores[at:at + n], found.rows[at:at + n],
                             found.image_ids[at:at + n], found.uris[at:at + n])
            answers.append((g[3], (part, allowed), None))
            at += n
        _deliver(answers)


def _deliver(answers: list) -> None:
    """Settle (waiter, result, error) triples: a concurrent Future here; asyncio futures
    in their loop, one call_soon_threadsafe per loop."""
    loops: dict = {}
    for waiter, result, error in answers:
        if isinstance(waiter, tuple):
            loops.setdefault(waiter[0], []).append((waiter[1], result, error))
        elif error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(result)
    for loop, settled in loops.items():
        try:
            loop.call_soon_threadsafe(_settle, settled)
        except RuntimeError:  # the loop closed: no one waits for these any more
            pass


def _settle(settled: list) -> None:
    for future, result, error in settled:
        if future.done():  # cancelled: the client went away
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class Engine:
    """Holds the current Snapshot and the embedder; reloads on a new version."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self._lock = threading.Lock()
        self._embedder = None
        self._embedder_key: tuple | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.reloads = 0
        self.reload_errors = 0
        self.batcher = Batcher()
        self.snapshot = self._load()

    # -- loading -------------------------------------------------------------------------

    def _table_dir(self, index: SimilarityIndex) -> str | None:
        if self.cfg.table:
            return self.cfg.table
        uri = index.manifest.get("table")
        return uri.rstrip("/").removesuffix("/log").removesuffix("/table") if uri else None

    def _load(self, previous: Snapshot | None = None) -> Snapshot:
        """Open the version CURRENT names, with its facets: built from `previous`'s and the
        table's changes when the version is an update of previous's, else afresh."""
        started = time.perf_counter()
        index = store.open_index(self.cfg.index, mmap=True)
        facets = None
        table_dir = self._table_dir(index)
        if table_dir is not None:
            try:
                table = open_table(table_dir)
            except LakelensError:
                if self.cfg.table:
                    raise
                logger.warning("the index's table %s cannot be opened: filters and overlays are off",
                               table_dir)
            else:
                since = self._update_base(previous, index, table_dir)
                if since is not None:
                    facets = Facets.updated(previous.facets, table, index.ids, since=since)
                else:
                    facets = Facets(table, index.ids)
        snap = Snapshot(index, facets, index.manifest.get("version", index.path.name),
                        facets.table_version if facets else None)
        logger.info("serving index %s version %s (%d images, %s%s) and table version %s; loaded in %.1f s",
                    self.cfg.index, snap.version, index.live_count(), index.manifest.get("factory"),
                    ", memory-mapped" if index.mmapped else "", snap.table_version,
                    time.perf_counter() - started)
        return snap

    def _update_base(self, previous: Snapshot | None, index: SimilarityIndex, table_dir: str) -> int | None:
        """The table version whose later changes turn previous's facets into `index`'s, or
        None when `index` is not an update of previous's index (a rebuild, another table,
        rows that do not extend the old ones): then the facets are built afresh."""
        if previous is None or previous.facets is None:
            return None
        up = index.manifest.get("last_update") or {}
        base = up.get("from_table_version")
        old = previous.index
        n0, n1 = len(old.ids), len(index.ids)
        if (base is None or up.get("rebuilt") or base != old.manifest.get("table_version")
                or self._table_dir(old) != table_dir or n1 - n0 != up.get("added")
                or previous.facets.rows != n0):
            return None
        for r in {0, n0 - 1} if n0 else ():  # the old rows come first, in their order
            if index.ids.image_ids[r].as_py() != old.ids.image_ids[r].as_py():
                return None
        return min(int(base), previous.facets.table_version)

    def current(self) -> Snapshot:
        with self._lock:
            return self.snapshot

    def reload_if_changed(self) -> bool:
        """Switch to the index version CURRENT names if it is not the one served; False if
        it is. Reads CURRENT only: a table commit alone reloads nothing."""
        snap = self.current()
        if store.current_name(self.cfg.index) == snap.version:
            return False
        fresh = self._load(snap)
        with self._lock:
            self.snapshot = fresh
        self.reloads += 1
        logger.info("switched from index %s (table %s) to %s (table %s, facets %s in %.2f s)", snap.version,
                    snap.table_version, fresh.version, fresh.table_version,
                    "updated" if fresh.facets and fresh.facets.incremental else "built",
                    fresh.facets.build_s if fresh.facets else 0.0)
        return True

    def start_watching(self) -> None:
        if self.cfg.reload_s <= 0 or self._watcher is not None:
            return

        def watch() -> None:
            while not self._stop.wait(self.cfg.reload_s):
                try:
                    self.reload_if_changed()
                except Exception as e:  # keep serving the version we have
                    self.reload_errors += 1
                    logger.warning("reload failed, still serving %s: %s", self.current().version, e)

        self._watcher = threading.Thread(target=watch, name="lakelens-reload", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()

    # -- queries -------------------------------------------------------------------------

    def embed(self, snap: Snapshot, images: list[bytes]) -> np.ndarray:
        """float32[len(images), dim] with the snapshot's embedder (loaded once, reused
        while the index's embedder stays the same). The uploads are checked first
        (check_uploads), from their headers."""
        from models.predict import EmbeddingPredictor

        self.check_uploads(images)

        embedder = snap.index.manifest["embedder"]
        key = (embedder["arch"], embedder["weights"])
        with self._lock:
            if self._embedder_key != key:
                self._embedder = EmbeddingPredictor(
                    embedder["arch"], weights=weights_spec(embedder, self.cfg.weights))
                self._embedder_key = key
            predictor = self._embedder
        short, long = embed_decode_sizes(embedder["arch"])
        pixels = []
        for n, data in enumerate(images):
            try:
                pixels.append(decode_image(data, max_pixels=self.cfg.max_pixels, short=short,
                                           long=long).pixels)
            except Exception as e:  # not an image, truncated, over the pixel limit
                raise LakelensError(f"upload {n + 1} is not a readable image: {_one_line(e)}") from e
        return np.stack(predictor(pixels)).astype(np.float32)

    def check_uploads(self, images: list[bytes]) -> int:
        """The uploads' pixels together, from their headers (nothing decoded): each must be
        an allowed format within --max-pixels (else a LakelensError naming it), and the sum
        within --max-request-pixels (else PixelBudgetError)."""
        total = 0
        for n, data in enumerate(images):
            try:
                w, h = probe_image(data, max_pixels=self.cfg.max_pixels)
            except Exception as e:  # not an allowed format, a bad header, over the pixel limit
                raise LakelensError(f"upload {n + 1} is not a readable image: {_one_line(e)}") from e
            total += w * h
        if total > self.cfg.max_request_pixels:
            raise PixelBudgetError(
                f"the {len(images)} uploaded image(s) hold {total} pixels together, over the budget "
                f"of {self.cfg.max_request_pixels} pixels per request (--max-request-pixels)")
        return total


def search_threads(workers: int = 1) -> int | None:
    """OpenMP threads for a service's search thread: the cores this process may use, shared
    by `workers` processes, less the one each event loop keeps busy (at least 1); None when
    OMP_NUM_THREADS is set (Ray sets it to a replica's CPUs), which then stands."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, len(os.sched_getaffinity(0)) // workers - 1)


def _true_rows(keep: np.ndarray, offset: int, limit: int, block: int = 1 << 20) -> np.ndarray:
    """int64 positions of the True values of `keep` from the offset-th on, at most `limit`;
    scanned a block at a time, so it never holds more than a block's positions."""
    out: list[np.ndarray] = []
    for start in range(0, len(keep), block):
        part = keep[start:start + block]
        n = int(np.count_nonzero(part))
        if offset >= n:
            offset -= n
            continue
        out.append(np.flatnonzero(part)[offset:offset + limit] + start)
        offset, limit = 0, limit - len(out[-1])
        if limit <= 0:
            break
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
