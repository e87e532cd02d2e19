"""GPU placement on simulated multi-node clusters (ray.cluster_utils.Cluster): nodes declare
logical GPUs and role labels; the models fall back to CPU. Every job finishes, every declared
GPU hosts one actor, every actor runs every asked model, decode runs on `decode` nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import AnnotateConfig
from tests.test_nightly import start_run, write_images

TASKS = ("detect", "segment", "pose", "embed")
TINY = {"detect": "fasterrcnn_tiny", "segment": "maskrcnn_tiny", "pose": "keypointrcnn_tiny",
        "embed": "tiny"}


def gpu_nodes(gpus: int) -> list[int]:
    """GPUs per model node: two per node, the last one takes what is left."""
    return [min(2, gpus - i) for i in range(0, gpus, 2)]


@pytest.fixture
def cluster_of():
    """A function that starts a cluster: a CPU head, one 1-CPU `model` node per two GPUs,
    one 1-CPU `decode` node; torn down after the test whatever happens."""
    import ray
    from ray.cluster_utils import Cluster

    started: list = []

    def start(gpus: int):
        mp = pytest.MonkeyPatch()
        mp.delenv("RAY_ADDRESS", raising=False)
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        started.append((c, mp))
        for n in gpu_nodes(gpus):
            c.add_node(num_cpus=1, num_gpus=n, labels={"lakelens/role": "model"})
        c.add_node(num_cpus=1, labels={"lakelens/role": "decode"})
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level="WARNING")
        return c

    yield start
    ray.shutdown()
    for c, mp in started:
        c.shutdown()
        mp.undo()


def run_and_check(cluster, tmp_path: Path, gpus: int, n_tasks: int) -> dict:
    import ray

    tasks = TASKS[:n_tasks]
    paths = write_images(tmp_path / "lake", 12, size=(96, 72))
    out = tmp_path / "out"
    cfg = AnnotateConfig(sources=(str(tmp_path / "lake"),), out=str(out), tasks=tasks,
                         weights=dict.fromkeys(tasks, "random"), archs={t: TINY[t] for t in tasks},
                         batch_size=2, chunk_size=4, score_threshold=0.0)
    thread, result = start_run(cfg)
    thread.join(timeout=300)
    assert not thread.is_alive(), f"hung; resources now {ray.available_resources()}"
    summary = result["summary"]
    assert (summary.annotated, summary.errors) == (len(paths), 0)
    record = json.loads((out / "runs" / f"{summary.run_id}.json").read_text())
    actors = record["actors"]
    # Every declared GPU hosts exactly one actor: one per (node, GPU id), as many as GPUs.
    held = {(a["node"], a["gpus"]) for a in actors}
    assert len(actors) == len(held) == gpus, actors
    assert all(a["gpus"] is not None and "," not in a["gpus"] for a in actors)
    per_node = {}
    for a in actors:
        per_node[a["node"]] = per_node.get(a["node"], 0) + 1
    assert sorted(per_node.values(), reverse=True) == gpu_nodes(gpus)
    # Every actor that got work ran every asked model on it (busy time > 0 for each).
    for a in actors:
        assert set(a["tasks"]) == set(tasks)
        if a["tasks"][tasks[0]]["images"]:
            assert all(a["tasks"][t]["busy_s"] > 0 for t in tasks), a
    assert sum(a["tasks"][tasks[-1]]["images"] for a in actors) == len(paths)
    # Decode ran on the decode node only, the models on model nodes only.
    role = {str(n.all_processes["raylet"][0].process.pid): (n._ray_params.labels or {}).get("lakelens/role")
            for n in cluster.list_all_nodes()}
    assert {role[node] for node in record["decode_nodes"]} == {"decode"}
    assert sum(record["decode_nodes"].values()) == len(paths)
    assert {role[a["node"]] for a in actors} == {"model"}
    return record


@pytest.mark.slow  # two simulated nodes, four pools: ~27 s; `make test-all` runs it
def test_three_gpus_on_two_nodes_four_tasks(cluster_of, tmp_path: Path) -> None:
    run_and_check(cluster_of(3), tmp_path, gpus=3, n_tasks=4)


@pytest.mark.slow  # three clusters, twelve runs: ~3.5 min on 2 cores
@pytest.mark.parametrize("gpus", [1, 2, 7])
def test_placement_matrix(cluster_of, tmp_path: Path, gpus: int) -> None:
    cluster = cluster_of(gpus)
    for n_tasks in (1, 2, 3, 4):
        run_and_check(cluster, tmp_path / f"t{n_tasks}", gpus=gpus, n_tasks=n_tasks)
