"""Near-duplicates: edges found every night through the index, groups at read time.

DIR/dedup   Delta, append-only, unpartitioned (EDGE_SCHEMA): one row per edge
            (image_id, neighbour_id, similarity, table_version, run_id): an image the
            index gained and one of its nearest *earlier* neighbours, at cosine
            similarity >= FLOOR.

Nightly (`nightly`, after `annotate --index` synced the index; under the run lock): the
images indexed since the table version the dedup table last covered are searched in the
index (their own vectors, k small); each keeps up to `k` neighbours indexed before it with
similarity >= FLOOR. "Before" is a total order that records each pair once: a neighbour
the night did not add, or one it added at a lower index row. The night's edges and the
table version they cover land in one commit whose app transaction `lakelens.dedup` holds
that version, so a rerun finds nothing left to do, and a run that crashed before the
commit leaves the next run to cover its images (no duplicate, no loss). Cost follows the
night's new images: two streamed reads of the table's log since that version (their ids,
then their embeddings: the query vectors, exact whatever the index compresses) and one
search per new image; memory holds one batch of queries and the night's new rows (an
int64 per new image), never a per-lake structure. (The first run covers every image the
index holds, once.) FLOOR sits well below any sensible threshold of a trained embedder,
so the table grows with the lake's duplicates, not with the lake.

Changed and vanished images: edges are never rewritten. An edge records the table
version it was found at; at read time (`load_graph`) it counts only while both images
have a current ok row committed at or before that version. An image that changed since
has a later row (its old edges are ignored) and is searched again as new by the next
night, which records its edges anew; one that vanished has no current row. An index
rebuild re-derives nothing: edges depend on the table's rows, not on index rows.
Forgotten images (`lakelens forget`) lose their edges for real: `erase` rewrites the
files naming them on either side and vacuums the replaced files.

Groups (`DedupGraph.groups`): the connected components of the valid edges at or above a
threshold (union-find by vectorised min-label hooking over the edges, which grow with
the duplicates only); a group's id is its smallest image_id, so it does not depend on
the order edges were found in, and two groups merge when a later image links them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import CommitProperties, Transaction

from index import store
from index.idmap import IdMap
from index.source import vectors_of
from models.errors import LakelensError
from pipelines.lake.table import LakeTable, col, location, open_table, part_index, rewrite_without

logger = logging.getLogger(__name__)

DEDUP_DIR = "dedup"
APP = "lakelens.dedup"  # app transaction: the table version the edges cover
# Edges below this cosine similarity are not stored: 0.06 below the default threshold, and
# high enough that the demo embedder's distinct images rarely reach it (README: 0.3 edges
# per image at 0.9, 2.7 at 0.8 on the synthetic lake, where every scene looks alike).
FLOOR = 0.9
# The default threshold (cosine similarity) for groups: calibrated on synthetic
# near-duplicates (JPEG, resize, brightness) of the demo lake with the demo's trained `tiny`
# embedder (README "Near-duplicates"; tests/test_dedup.py, -m slow, measures it again).
DEFAULT_THRESHOLD = 0.96
NEIGHBOURS = 5  # earlier neighbours kept per new image (at or above FLOOR)
MAX_FETCH = 1024  # a query's search widens (x4) up to this many hits to find earlier ones
QUERY_BATCH = 4096  # new images searched per FAISS call
EDGE_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False,
             metadata={"doc": "an image the index gained in this run"}),
    pa.field("neighbour_id", pa.string(), nullable=False,
             metadata={"doc": "an image indexed before it (records each pair once)"}),
    pa.field("similarity", pa.float32(), nullable=False,
             metadata={"doc": "cosine similarity of their embeddings", "unit": "cosine"}),
    pa.field("table_version", pa.int64(), nullable=False,
             metadata={"doc": "the annotations table version the edge was found at; it counts "
                              "while neither image has a current row committed after it"}),
    pa.field("run_id", pa.string(), metadata={"doc": "the run that found it"}),
    pa.field("found_at", pa.timestamp("us", tz="UTC")),
])


def dedup_uri(out: str) -> str:
    return location(out, DEDUP_DIR)


def open_edges(out: str) -> DeltaTable | None:
    """DIR/dedup, or None where no run has written one."""
    try:
        return DeltaTable(dedup_uri(out))
    except (TableNotFoundError, OSError):
        return None


def _create(out: str) -> DeltaTable:
    DeltaTable.create(dedup_uri(out), EDGE_SCHEMA, mode="ignore", name="lakelens_dedup",
                      description="lakelens near-duplicate edges (append-only)")
    return DeltaTable(dedup_uri(out))


def check_threshold(threshold: float, name: str = "--threshold ") -> float:
    """`threshold` if it is a similarity the dedup table can answer, else a LakelensError
    naming it as `name` (the CLI's flag; the service's query parameter)."""
    if not FLOOR <= threshold <= 1.0:
        raise LakelensError(f"{name}{threshold}: a cosine similarity in [{FLOOR}, 1] (edges "
                            f"below {FLOOR} are not stored); the calibrated default is {DEFAULT_THRESHOLD}")
    return float(threshold)


# -- nightly ------------------------------------------------------------------------------

def _indexed_since(table: LakeTable, since: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The latest rows committed after `since` that carry an embedding (every current one
    when `since` < 0), streamed part by part."""
    flt = pc.field("embedding").is_valid()
    if since < 0:
        yield from table.current(columns, where=flt)
        return
    for part in table.parts():
        yield from table.changes(part, since, columns, where=(col("status") == "ok") & flt)


def _new_rows(table: LakeTable, index: store.SimilarityIndex, since: int) -> np.ndarray:
    """Sorted live index rows of the images whose latest row was committed after `since`
    (every live row when `since` < 0: the first run covers the whole index)."""
    if since < 0:
        return np.flatnonzero(index.live).astype(np.int64)
    found = [np.zeros(0, np.int64)]
    for batch in _indexed_since(table, since, ["image_id"]):
        rows = index.ids.rows_of(batch.column("image_id"))
        found.append(rows[rows >= 0])
    return np.unique(np.concatenate(found)).astype(np.int64)


def _queries(table: LakeTable, index: store.SimilarityIndex, since: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(index rows, their vectors) of the images indexed since `since`, QUERY_BATCH at a
    time. The vectors are the table's embeddings (exact, whatever the index compresses),
    taken from the rows the index holds."""
    rows_buf, vec_buf, held = [], [], 0
    for batch in _indexed_since(table, since, ["image_id", "embedding"]):
        rows = index.ids.rows_of(batch.column("image_id"))
        live = rows >= 0
        if not live.any():
            continue
        rows_buf.append(rows[live])
        vec_buf.append(vectors_of(batch.column("embedding").filter(pa.array(live)), index.dim))
        held += int(live.sum())
        if held >= QUERY_BATCH:
            yield np.concatenate(rows_buf), np.concatenate(vec_buf)
            rows_buf, vec_buf, held = [], [], 0
    if held:
        yield np.concatenate(rows_buf), np.concatenate(vec_buf)


def _similarity(scores: np.ndarray, metric: str) -> np.ndarray:
    """Cosine similarity from FAISS scores of unit vectors (inner product, or squared L2)."""
    return scores if metric == "ip" else 1.0 - scores / 2.0


def earlier_neighbours(index: store.SimilarityIndex, rows: np.ndarray, vectors: np.ndarray,
                       new: np.ndarray, *, k: int = NEIGHBOURS, floor: float = FLOOR
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to k neighbours of each index row in `rows` (a batch of `new`, the sorted rows the
    run added; `vectors` theirs) that were indexed before it (not in `new`, or in `new` at
    a lower row), with cosine similarity >= floor, nearest first. Returns (query rows,
    neighbour rows, similarities), one entry per edge."""
    metric = index.manifest.get("metric", "ip")
    out_q, out_n, out_s = [], [], []
    todo, todo_vectors = rows, vectors
    fetch = min(2 * k + 1, index.live_count())
    while len(todo) and fetch > 0:
        found = index.search(todo_vectors, fetch)
        width = fetch
        hits = np.full((len(todo), width), -1, np.int64)
        sims = np.full((len(todo), width), -np.inf, np.float32)
        for i, (r, s) in enumerate(zip(found.rows, found.scores, strict=True)):
            hits[i, :len(r)] = r
            sims[i, :len(s)] = _similarity(np.asarray(s, np.float32), metric)
        q = todo[:, None]
        at = np.searchsorted(new, hits)
        is_new = (at < len(new)) & (new[np.minimum(at, len(new) - 1)] == hits)
        keep = (hits >= 0) & (hits != q) & (sims >= floor) & (~is_new | (hits < q))
        taken = np.cumsum(keep, axis=1)
        keep &= taken <= k
        done = taken[:, -1] >= k
        # the last hit still at or above the floor: more earlier neighbours may lie beyond
        full = np.array([len(r) == width for r in found.rows], bool)
        more = ~done & full & (sims[:, -1] >= floor) & (width < min(MAX_FETCH, index.live_count()))
        final = ~more
        qi, ni = np.nonzero(keep & final[:, None])
        out_q.append(todo[qi])
        out_n.append(hits[qi, ni])
        out_s.append(sims[qi, ni])
        todo, todo_vectors = todo[more], todo_vectors[more]
        fetch = min(fetch * 4, MAX_FETCH, index.live_count())
    if not out_q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_q), np.concatenate(out_n), np.concatenate(out_s).astype(np.float32)


def nightly(out: str, index_dir: str, *, run_id: str, k: int = NEIGHBOURS, floor: float = FLOOR) -> dict:
    """Record the edges of the images INDEX_DIR gained since the dedup table last caught up
    (see the module's docstring), in one commit that also records the table version they
    cover. Call under the run lock, after the index was synced. Returns what was done."""
    started = time.perf_counter()
    index = store.open_index(index_dir, mmap=True)
    target = index.manifest.get("table_version")
    if target is None:
        raise LakelensError(f"{index_dir} was not built from a lakelens table; rebuild it with "
                            "`lakelens index build`")
    dt = _create(out)
    seen = dt.transaction_version(APP)
    seen = -1 if seen is None else int(seen)
    if seen >= int(target):
        return {"edges": 0, "searched": 0, "table_version": seen, "unchanged": True, "seconds": 0.0}
    table = open_table(out)
    new = _new_rows(table, index, seen)
    qs, ns, ss = [], [], []
    for rows, vectors in _queries(table, index, seen):
        q, n, s = earlier_neighbours(index, rows, vectors, new, k=k, floor=floor)
        qs.append(q)
        ns.append(n)
        ss.append(s)
    q = np.concatenate(qs) if qs else np.zeros(0, np.int64)
    n = np.concatenate(ns) if ns else np.zeros(0, np.int64)
    ids = index.ids.image_ids
    edges = pa.table({
        "image_id": ids.take(pa.array(q)), "neighbour_id": ids.take(pa.array(n)),
        "similarity": pa.array(np.concatenate(ss) if ss else np.zeros(0, np.float32), pa.float32()),
        "table_version": pa.array(np.full(len(q), int(target), np.int64)),
        "run_id": pa.repeat(pa.scalar(run_id, pa.string()), len(q)),
        "found_at": pa.repeat(pa.scalar(datetime.now(UTC), EDGE_SCHEMA.field("found_at").type), len(q)),
    }, schema=EDGE_SCHEMA).sort_by("image_id")
    _commit(dt, edges, target=int(target), run_id=run_id)
    done = {"edges": edges.num_rows, "searched": int(len(new)), "table_version": int(target),
            "from_table_version": seen, "seconds": round(time.perf_counter() - started, 3)}
    logger.info("dedup: %d new images searched, %d edges at similarity >= %.2f (table version %d)",
                done["searched"], done["edges"], floor, target)
    return done


def _commit(dt: DeltaTable, edges: pa.Table, *, target: int, run_id: str) -> None:
    """Append the edges and the version they cover in one commit (an empty one when there
    are none: the version still moves); a commit that already landed is not repeated."""
    props = CommitProperties(app_transactions=[Transaction(APP, target)], max_commit_retries=0,
                             custom_metadata={"lakelens.run_id": run_id,
                                              "lakelens.dedup_edges": str(edges.num_rows)})
    dt.update_incremental()
    if (dt.transaction_version(APP) or -1) >= target:
        return
    try:
        write_deltalake(dt, edges, mode="append", commit_properties=props)
    except Exception:
        dt.update_incremental()
        if (dt.transaction_version(APP) or -1) >= target:  # it landed; its answer was lost
            return
        raise


def describe_nightly(done: dict) -> str:
    if done.get("unchanged"):
        return f"near-duplicates: already at table version {done['table_version']}"
    return (f"near-duplicates: {done['searched']} new images searched, {done['edges']} edges "
            f"recorded ({done['seconds']:.1f} s)")


# -- reading: valid edges and groups -------------------------------------------------------

def _current_rows(table: LakeTable, ids: pa.Array, columns: list[str]) -> pa.Table:
    """The current ok rows of `ids` (a small set), reading only the parts that hold them."""
    parts = table.parts()
    want = pc.unique(ids).cast(pa.string())
    idx = part_index(want, parts)
    batches = []
    for i in np.unique(idx):
        these = want.filter(pa.array(idx == i))
        batches += [pa.Table.from_batches([b]) for b in table.current_part(
            parts[i], columns, where=col("image_id").isin(these))]
    if not batches:
        return pa.table({c: pa.array([], table_type(c)) for c in columns})
    return pa.concat_tables(batches, promote_options="permissive").combine_chunks()


def table_type(name: str) -> pa.DataType:
    from pipelines.schema import TABLE_SCHEMA

    return TABLE_SCHEMA.field(name).type


class Groups:
    """Duplicate groups at one threshold: one entry per image in a group (sorted by
    image_id), its group id (the group's smallest image_id), uri and cosine similarity to
    the group's representative (the image group_id names). Lookups are binary searches:
    nothing here scans the members per question."""

    def __init__(self, threshold: float, graph: DedupGraph, members: np.ndarray, label: np.ndarray):
        self.threshold = threshold
        self._graph = graph
        self._nodes = members  # member -> node of the graph (sorted: node ids are sorted)
        self._label = label  # member -> node of its representative
        take = pa.array(members.astype(np.int64))
        self.image_id = graph.node_id.take(take)
        self.uri = graph.uri.take(take)
        self.group_id = graph.node_id.take(pa.array(label.astype(np.int64)))
        emb = graph.embedding
        sim = np.einsum("ij,ij->i", emb[members], emb[label]) if len(members) else np.zeros(0)
        self.rep_similarity = np.clip(sim, -1, 1).astype(np.float32)
        self._by_group = np.argsort(label, kind="stable")
        self._sorted_label = label[self._by_group]
        self._ids = IdMap(self.image_id, self.uri, np.ones(len(members), bool))

    def summary(self) -> dict:
        sizes = np.unique(self._label, return_counts=True)[1]
        return {"threshold": self.threshold, "groups": int(len(sizes)),
                "images_in_groups": int(len(self._nodes)), "largest_group": int(sizes.max(initial=0)),
                "edges": int(self._graph.edges)}

    def to_table(self) -> pa.Table:
        """image_id, uri, group_id, group_size, similarity (to the representative)."""
        labels, counts = np.unique(self._label, return_counts=True)
        size = counts[np.searchsorted(labels, self._label)] if len(labels) else np.zeros(0, np.int64)
        return pa.table({"image_id": self.image_id, "uri": self.uri, "group_id": self.group_id,
                         "group_size": pa.array(size.astype(np.int32)),
                         "similarity": pa.array(self.rep_similarity, pa.float32())})

    def _member(self, image_id: str) -> int | None:
        if not len(self._nodes):
            return None
        i = int(self._ids.rows_of(pa.array([image_id], pa.string()))[0])
        return i if i >= 0 else None

    def group_of(self, image_id: str) -> str | None:
        """The group id of image_id, or None when it is in no group."""
        i = self._member(image_id)
        return None if i is None else self.group_id[i].as_py()

    def duplicates(self, image_id: str) -> list[dict]:
        """The other members of image_id's group, most similar to it first (cosine)."""
        i = self._member(image_id)
        if i is None:
            return []
        lo, hi = np.searchsorted(self._sorted_label, self._label[i], side="left"), np.searchsorted(
            self._sorted_label, self._label[i], side="right")
        same = self._by_group[lo:hi]
        same = same[same != i]
        emb = self._graph.embedding
        sims = emb[self._nodes[same]] @ emb[self._nodes[i]]
        order = np.argsort(-sims, kind="stable")
        return [{"image_id": self.image_id[int(j)].as_py(), "uri": self.uri[int(j)].as_py(),
                 "similarity": round(float(np.clip(sims[o], -1, 1)), 6)}
                for o, j in zip(order, same[order], strict=True)]


@dataclass(frozen=True)
class DedupGraph:
    """The valid edges (both images current and unchanged since the edge was found) and
    their images: ids (sorted), uris, embeddings. Small: it grows with duplicates."""

    node_id: pa.Array
    uri: pa.Array
    embedding: np.ndarray  # float32[nodes, dim]
    a: np.ndarray  # edge ends, rows of node_id
    b: np.ndarray
    similarity: np.ndarray
    table_version: int | None  # of the annotations table read

    @property
    def edges(self) -> int:
        return len(self.a)

    def groups(self, threshold: float = DEFAULT_THRESHOLD) -> Groups:
        threshold = check_threshold(threshold)
        strong = self.similarity >= threshold
        a, b = self.a[strong], self.b[strong]
        label = components(a, b, len(self.node_id))
        members = np.unique(np.concatenate([a, b]))  # sorted: node ids are sorted
        return Groups(threshold, self, members, label[members])


def components(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Connected components of n nodes joined by edges (a[i], b[i]): each node's label is
    the smallest node of its component. Roots hook onto smaller roots, then paths are
    halved to their roots, until every edge joins one root: whole arrays per pass."""
    parent = np.arange(n)
    while len(a):
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        split = lo != hi
        if not split.any():
            break
        np.minimum.at(parent, hi[split], lo[split])
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
    return parent


def load_graph(out: str | LakeTable, *, index: store.SimilarityIndex | None = None) -> DedupGraph:
    """DIR/dedup's valid edges against the table's current view (of `out`, or of the given
    opened table at its version); with `index`, only images live in it. Raises
    LakelensError when DIR has no dedup table."""
    table = out if isinstance(out, LakeTable) else open_table(out)
    dt = open_edges(table.out)
    if dt is None:
        raise LakelensError(f"{table.out!r} has no near-duplicate table: run `lakelens annotate ... "
                            f"--out {table.out} --index INDEX_DIR` to find them")
    edges = dt.to_pyarrow_dataset().to_table(columns=["image_id", "neighbour_id", "similarity",
                                                      "table_version"])
    edges = edges.cast(pa.schema([EDGE_SCHEMA.field(c) for c in edges.column_names]))
    nodes = pc.unique(pa.concat_arrays([edges.column("image_id").combine_chunks(),
                                        edges.column("neighbour_id").combine_chunks()]))
    rows = _current_rows(table, nodes, ["image_id", "uri", "committed_in", "embedding"]) if len(
        nodes) else None
    if rows is None or not rows.num_rows:
        empty = pa.array([], pa.string())
        return DedupGraph(empty, empty, np.zeros((0, 0), np.float32), np.zeros(0, np.int64),
                          np.zeros(0, np.int64), np.zeros(0, np.float32), table.version)
    rows = rows.filter(pc.is_valid(rows.column("embedding")))
    if index is not None:
        rows = rows.filter(pa.array(index.ids.rows_of(rows.column("image_id")) >= 0))
    rows = rows.sort_by("image_id")
    node_id = rows.column("image_id").combine_chunks()
    a, b = (pc.fill_null(pc.index_in(edges.column(c), value_set=node_id), -1).to_numpy().astype(np.int64)
            for c in ("image_id", "neighbour_id"))
    found_at = edges.column("table_version").to_numpy()
    committed = rows.column("committed_in").to_numpy()
    ok = (a >= 0) & (b >= 0)
    ok[ok] &= (committed[a[ok]] <= found_at[ok]) & (committed[b[ok]] <= found_at[ok])
    dim = len(rows.column("embedding")[0]) if rows.num_rows else 0
    emb = pc.list_flatten(rows.column("embedding").combine_chunks()).to_numpy(
        zero_copy_only=False).astype(np.float32).reshape(rows.num_rows, dim)
    sim = edges.column("similarity").to_numpy().astype(np.float32)
    return DedupGraph(node_id, rows.column("uri").combine_chunks(), emb, a[ok], b[ok], sim[ok],
                      table.version)


def groups(out: str, threshold: float = DEFAULT_THRESHOLD) -> Groups:
    """`lakelens dedup DIR`: the duplicate groups of DIR at `threshold`."""
    check_threshold(threshold)
    return load_graph(out).groups(threshold)


def write_groups(found: Groups, path: str) -> int:
    """One Parquet row per image in a group: image_id, uri, group_id, group_size, similarity
    (cosine to the group's representative, the image named by group_id). Returns rows."""
    rows = found.to_table()
    try:
        pq.write_table(rows, path)
    except OSError as e:
        raise LakelensError(f"--out {path}: cannot write ({e})") from e
    return rows.num_rows


# -- erasure ------------------------------------------------------------------------------

def erase(out: str, ids: pa.Array) -> int:
    """Remove every edge naming one of `ids` on either side: the files holding them are
    rewritten without them in one commit (each new file added, each old one removed), then
    the replaced files are vacuumed, so no version keeps them. Returns edges removed."""
    dt = open_edges(out)
    if dt is None:
        return 0
    ids = ids.cast(pa.string())
    hit = pc.field("image_id").cast(pa.string()).isin(ids) | pc.field("neighbour_id").cast(
        pa.string()).isin(ids)

    def drop(rows: pa.Table) -> pa.Array:
        return pc.or_(pc.is_in(rows.column("image_id"), value_set=ids),
                      pc.is_in(rows.column("neighbour_id"), value_set=ids))

    removed = rewrite_without(dt, out, DEDUP_DIR, dt.to_pyarrow_dataset(), EDGE_SCHEMA, hit, drop)
    dt.update_incremental()
    dt.vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False)
    logger.info("erased %d near-duplicate edges of %d forgotten images", removed, len(ids))
    return removed
