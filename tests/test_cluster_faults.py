"""Faults on a multi-node local cluster (ray.cluster_utils.Cluster): a node removed
mid-run, and a poison image that kills every worker that reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from deltalake import DeltaTable

from pipelines.config import AnnotateConfig
from tests.helpers import read_current
from tests.test_nightly import EMBED, assert_one_current_row_each, start_run, wait_for_commits, write_images

pytestmark = pytest.mark.slow  # a three-node cluster on 2 cores: ~80 s; `make test-all` runs it


def _kill_on_poison():
    """A Ray worker setup hook (pickled by value): every worker's reads of a file named
    poison.png SIGKILL the worker, as a decoder's segfault would. Injected through Ray,
    nothing in lakelens's read path knows about it."""

    def hook() -> None:
        import os
        import signal

        from pipelines.annotate import read

        real = read.read_with_retries

        def read_or_die(uri: str, *args, **kwargs):
            if uri.endswith("poison.png"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(uri, *args, **kwargs)

        read.read_with_retries = read_or_die

    return hook


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        workers = [c.add_node(num_cpus=1) for _ in range(2)]
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level="WARNING",
                 runtime_env={"worker_process_setup_hook": _kill_on_poison()})
        try:
            yield c, workers
        finally:
            ray.shutdown()
            c.shutdown()


def test_removing_a_node_mid_run_accounts_for_every_image(cluster, tmp_path: Path) -> None:
    c, workers = cluster
    paths = write_images(tmp_path / "lake", 150, size=(96, 72))
    out = tmp_path / "out"
    cfg = AnnotateConfig(sources=(str(tmp_path / "lake"),), out=str(out), chunk_size=8,
                         batch_size=4, **EMBED)
    thread, result = start_run(cfg)
    wait_for_commits(thread, out)
    import ray

    driver = ray._private.worker.global_worker.node._raylet_socket_name
    victim = next(w for w in workers if w._raylet_socket_name != driver)
    c.remove_node(victim, allow_graceful=False)  # its processes die with whatever blocks they had
    thread.join(timeout=240)
    assert not thread.is_alive(), f"hung; resources now {ray.available_resources()}"
    summary = result["summary"]
    assert summary.annotated + summary.errors == 150
    assert_one_current_row_each(out, [str(p) for p in paths])
    assert len(DeltaTable(str(out / "log")).to_pandas()) == 150


def test_a_poison_image_is_isolated_as_worker_crashed(cluster, tmp_path: Path) -> None:
    paths = write_images(tmp_path / "lake", 30)
    poison = paths[7].rename(paths[7].with_name("poison.png"))
    paths[7] = poison
    out = tmp_path / "out"
    thread, result = start_run(AnnotateConfig(sources=(str(tmp_path / "lake"),), out=str(out),
                                              chunk_size=8, batch_size=4, **EMBED))
    thread.join(timeout=240)
    import ray

    assert not thread.is_alive(), f"hung; resources now {ray.available_resources()}"
    summary = result["summary"]
    assert (summary.annotated, summary.errors, summary.crashed) == (29, 1, 1)
    assert_one_current_row_each(out, [str(p) for p in paths])
    errors = read_current(out, "error").to_pylist()
    assert [(e["uri"], e["error_stage"], e["error_type"]) for e in errors] == [
        (str(poison), "crash", "WorkerCrashed")]
    assert errors[0]["error_retryable"] is True
