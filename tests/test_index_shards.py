"""The index built in shards on a real Ray cluster (a head and 2 worker nodes), against
the same build in one process; and the index writer's lock."""

from __future__ import annotations

import hashlib
from pathlib import Path

import faiss
import numpy as np
import pytest

from index.shards import list_contents
from index.store import open_index
from index.versions import current_dir, load_manifest, read_ids, segments_of
from models.errors import LakelensError
from pipelines.indexing import IndexBuildConfig, build, index_lock, update
from pipelines.indexing.build import build_locked
from tests.helpers import clustered_vectors, write_results

DIM = 32
N = 24_000
FACTORY = "IVF64,PQ16x4fsr,Refine(SQfp16)"


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level="WARNING")
        try:
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


def hex_ids(n: int, salt: str = "") -> list[str]:
    """lakelens-like image ids (32 hex digits), spread over every part of the table."""
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest()[:32] for i in range(n)]


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> tuple[Path, np.ndarray, list[str]]:
    root = tmp_path_factory.mktemp("shards")
    data = clustered_vectors(N, DIM, seed=5)
    ids = hex_ids(N)
    write_results(root / "lake", data, ids=ids)
    return root / "lake", data, ids


def _refine_codes(index: faiss.Index) -> np.ndarray:
    refine = faiss.downcast_index(faiss.downcast_index(index).refine_index)
    return faiss.vector_to_array(refine.codes)


def test_sharded_build_equals_one_process_build(cluster, lake, tmp_path: Path) -> None:
    out, data, ids = lake
    sharded = build(IndexBuildConfig(results=str(out), out=str(tmp_path / "sharded"), factory=FACTORY,
                                     train_sample=5000, shards=3))
    assert sharded["shards"] == 3 and sharded["built_on"].startswith("ray")
    assert sharded["count"] == N and sharded["recall_at_10"] >= 0.9
    vdir = current_dir(tmp_path / "sharded")
    [seg] = segments_of(load_manifest(vdir))
    assert len(seg.id_files) == 3  # one id file per shard, never gathered in one object
    trained = faiss.read_index(str(vdir.parent / seg.dir / "trained.faiss"))
    assert trained.ntotal == 0 and trained.is_trained
    # The same trained index, every row added by one process in row order.
    with index_lock(str(tmp_path / "one")):
        one = build_locked(IndexBuildConfig(results=str(out), out=str(tmp_path / "one"), factory=FACTORY,
                                            shards=0), trained=trained)
    assert one["shards"] == 1 and one["count"] == N
    a, b = open_index(tmp_path / "sharded"), open_index(tmp_path / "one")
    lists_a, lists_b = list_contents(a.index), list_contents(b.index)
    assert sum(len(x) for x in lists_a) == N
    assert all(np.array_equal(x, y) for x, y in zip(lists_a, lists_b, strict=True))  # exact list contents
    assert np.array_equal(_refine_codes(a.index), _refine_codes(b.index))
    one_dir = current_dir(tmp_path / "one")
    assert read_ids(vdir, load_manifest(vdir)).equals(read_ids(one_dir, load_manifest(one_dir)))
    assert sorted(read_ids(vdir, load_manifest(vdir)).column("image_id").to_pylist()) == sorted(ids)
    q = data[::211] + 0.01
    ra, rb = a.search(q, 10), b.search(q, 10)
    assert ra.image_ids == rb.image_ids
    np.testing.assert_array_equal(np.stack(ra.scores), np.stack(rb.scores))
    assert sharded["search_params"] == one["search_params"]


def test_update_after_a_sharded_build_adds_a_segment(cluster, lake, tmp_path: Path) -> None:
    out, data, ids = lake
    import shutil

    shutil.copytree(out, tmp_path / "lake")
    build(IndexBuildConfig(results=str(tmp_path / "lake"), out=str(tmp_path / "idx"), factory=FACTORY,
                           train_sample=5000, shards=2))
    more = clustered_vectors(300, DIM, seed=9)
    new_ids = hex_ids(300, salt="night2-")
    changed = data[:50] * -1.0
    write_results(tmp_path / "lake", np.concatenate([more, changed]), ids=new_ids + ids[:50],
                  hashes=[f"n-{i}" for i in new_ids] + [f"c-{i}" for i in ids[:50]], run_id="run-b")
    m = update(str(tmp_path / "idx"), str(tmp_path / "lake"))
    assert (m["last_update"]["added"], m["last_update"]["replaced"]) == (350, 50)
    assert [s["rows"] for s in m["segments"]] == [N, 350]
    idx = open_index(tmp_path / "idx")
    assert len(idx) == N + 300 and idx.index.ntotal == N + 350
    assert idx.search(more[:1], 1).image_ids[0] == [new_ids[0]]
    assert idx.search(changed[:1], 1).image_ids[0] == [ids[0]]  # found by its new vector
    assert ids[0] not in idx.search(data[:1], 3).image_ids[0]  # never by its old one


def test_a_second_index_writer_is_refused_in_one_line(lake, tmp_path: Path) -> None:
    out, _, _ = lake
    with index_lock(str(tmp_path / "idx")):
        with pytest.raises(LakelensError, match="is locked by") as e:
            build(IndexBuildConfig(results=str(out), out=str(tmp_path / "idx"), factory="Flat"))
        assert "\n" not in str(e.value)
    m = build(IndexBuildConfig(results=str(out), out=str(tmp_path / "idx"), factory="Flat"))
    assert m["count"] == N


def test_a_shard_on_another_node_returns_itself_through_the_object_store(lake, tmp_path: Path) -> None:
    """A shard task that cannot see the driver's segment directory (another node's disk)
    returns the shard and its id map as its result instead of writing them there."""
    from index import build as B
    from index.shards import shard_template
    from pipelines.indexing.sharded import _shard_task
    from pipelines.lake.table import open_table

    out, data, ids = lake
    table = open_table(str(out))
    trained = B.new_index(FACTORY, DIM, "ip")
    trained.train(data[:5000])
    parts = table.parts()[:3]
    counted = sum(b.num_rows for p in parts for b in table.current_part(p, ["image_id"]))
    queries = data[:5]
    blob, id_table, (scores, found) = _shard_task(
        str(out), table.versions, parts, 0, counted, faiss.serialize_index(shard_template(trained)),
        queries, np.arange(5), "ip", DIM, 4096, str(tmp_path / "not-on-this-node"), "ids-00000.parquet")
    shard = faiss.deserialize_index(blob)
    assert shard.ntotal == counted == id_table.num_rows
    assert set(id_table.column("image_id").to_pylist()) <= set(ids)
    assert scores.shape == found.shape == (5, 11)
    assert not (tmp_path / "not-on-this-node").exists()
