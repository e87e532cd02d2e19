"""`annotate` end to end on a real local Ray: the bad-input zoo, schema and contents."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from models.masks import rle_to_mask
from pipelines.annotate import run
from pipelines.annotate.read import read_decode
from pipelines.annotate.stages import ModelStage
from pipelines.cluster.placement import plan_pools
from pipelines.config import AnnotateConfig, TaskConfig
from pipelines.lake.sources import image_id
from pipelines.schema import SCHEMA_VERSION, TABLE_SCHEMA, TASK_TYPES
from tests.conftest import TINY_ARCHS
from tests.helpers import read_current, read_errors, read_results
from tests.zoo import ZOO_MAX_IMAGE_MB, ZOO_NON_IMAGES, build_zoo


@pytest.fixture(scope="module")
def zoo_run(ray_local, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("annotate")
    cases = build_zoo(root)
    missing = root / "gone" / "missing.jpg"
    (root / "extra.txt").write_text(f"{missing}\n")
    cfg = AnnotateConfig(sources=(str(root / "lake"), str(root / "extra.txt")),
                         out=str(root / "out"), weights={t: "random" for t in TINY_ARCHS},
                         archs=dict(TINY_ARCHS), image_size=64, batch_size=4,
                         score_threshold=0.0, chunk_size=10, max_image_mb=ZOO_MAX_IMAGE_MB)
    summary = run(cfg)
    out = Path(cfg.out)
    return cases, missing, summary, out, read_results(out), read_errors(out)


def test_every_image_ends_as_exactly_one_row(zoo_run) -> None:
    cases, missing, summary, out, results, errors = zoo_run
    listed = [str(c.path) for c in cases] + [str(missing)]
    assert summary.listed == len(listed)
    assert results.num_rows + errors.num_rows == len(listed)
    assert sorted(results.column("uri").to_pylist() + errors.column("uri").to_pylist()) == sorted(listed)
    assert summary.annotated == results.num_rows and summary.errors == errors.num_rows
    assert summary.skipped_non_images == ZOO_NON_IMAGES and summary.new == len(listed)
    current = read_current(out)
    assert current.num_rows == len(listed)
    assert len(set(current.column("image_id").to_pylist())) == len(listed)


def test_each_zoo_case_has_its_exact_outcome(zoo_run) -> None:
    cases, missing, _, _, results, errors = zoo_run
    by_uri = {r["uri"]: r for r in results.to_pylist()}
    err_by_uri = {r["uri"]: r for r in errors.to_pylist()}
    for case in cases:
        uri = str(case.path)
        if case.stage is None:
            assert uri in by_uri, (case.name, err_by_uri.get(uri))
            assert (by_uri[uri]["width"], by_uri[uri]["height"]) == case.size, case.name
        else:
            row = err_by_uri[uri]
            assert (row["error_stage"], row["error_type"]) == (case.stage, case.error_type), case.name
            assert row["error_message"] and "\n" not in row["error_message"]
            assert all(n in row["error_message"] for n in case.needles), (case.name, row["error_message"])
            assert row["error_retryable"] is False  # undecodable bytes: not until they change
    row = err_by_uri[str(missing)]
    assert (row["error_stage"], row["error_type"], row["error_retryable"]) == (
        "read", "FileNotFoundError", False)


def test_results_follow_the_schema_and_are_consistent(zoo_run) -> None:
    _, _, summary, out, results, errors = zoo_run
    meta = json.loads((out / "lakelens.json").read_text())
    assert meta["schema_version"] == SCHEMA_VERSION and meta["embedding_dim"] == 128
    assert len(meta["models"]["pose"]["keypoint_names"]) == 17
    assert results.schema.names == TABLE_SCHEMA.names
    for field in TABLE_SCHEMA:
        assert results.schema.field(field.name).type == field.type, field.name
    assert set(results.column("run_id").to_pylist()) == {summary.run_id}
    assert set(results.column("status").to_pylist()) == {"ok"}
    assert set(results.column("reason").to_pylist()) == {"new"}
    assert set(errors.column("status").to_pylist()) == {"error"}
    n_instances = n_poses = 0
    for row in results.to_pylist():
        w, h = row["width"], row["height"]
        assert row["image_id"] == image_id(row["uri"])
        assert len(row["content_hash"]) == 64
        assert [m["task"] for m in row["models"]] == ["detect", "segment", "pose", "embed"]
        for det in row["detections"] + row["instances"] + row["poses"]:
            x0, y0, x1, y1 = det["box"]
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h, (row["uri"], det["box"])
        for inst in row["instances"]:
            mask = rle_to_mask(inst["mask"])
            assert mask.shape == (h, w)
            n_instances += 1
        for pose in row["poses"]:
            kp = np.array(pose["keypoints"]).reshape(-1, 3)
            assert kp.shape == (17, 3)
            assert (kp[:, 0] >= 0).all() and (kp[:, 0] <= w).all() and (kp[:, 1] <= h).all()
            n_poses += 1
        emb = np.array(row["embedding"], dtype=np.float32)
        assert emb.shape == (128,) and abs(float(np.linalg.norm(emb)) - 1) < 1e-4
    # Score threshold 0: random heads propose something, so masks and keypoints were checked.
    assert n_instances > 0 and n_poses > 0


def test_run_record_and_no_temporary_files(zoo_run) -> None:
    _, _, summary, out, results, _ = zoo_run
    record = json.loads((out / "runs" / f"{summary.run_id}.json").read_text())
    assert record["counts"] == summary.counts()
    assert record["counts"]["annotated"] == results.num_rows
    # chunk_size=10: one commit per chunk, the first at FIRST_CHUNK_ROWS (8) images
    assert record["chunks"] == 1 + -(-(summary.listed - 8) // 10)
    assert [m["arch"] for m in record["models"]] == list(TINY_ARCHS.values())
    assert record["images_per_s"] > 0
    assert list((out / "_lakelens" / "staging").iterdir()) == []
    # seconds since the process began: the model actors started before the diff ended,
    # and the first chunk (16 images) was committed before the last
    t = record["timeline_s"]
    assert t["ray_ready"] <= t["pass_started"] < t["diffed"] <= t["first_commit"] < t["last_commit"]
    leftovers = [p for p in out.rglob("*") if p.suffix == ".tmp"]
    assert leftovers == []


def test_a_second_run_is_incremental_and_full_reannotates(zoo_run, ray_local) -> None:
    cases, _, first, out, _, _ = zoo_run
    lake = cases[0].path.parent
    cfg = AnnotateConfig(sources=(str(lake),), out=str(out), tasks=("embed",),
                         weights={"embed": "random"}, archs={"embed": "tiny"})
    again = run(cfg)
    assert (again.new, again.changed, again.annotated, again.errors) == (0, 0, 0, 0)
    assert again.unchanged == first.listed - 1 and again.vanished == 1  # the manifest's file
    one = run(dataclasses.replace(cfg, sources=(str(lake / "plain.jpg"),), full=True))
    assert (one.listed, one.annotated, one.vanished) == (1, 1, first.listed - 1)
    row = [r for r in read_results(out).to_pylist() if r["uri"] == str(lake / "plain.jpg")][0]
    assert row["detections"] is None and row["instances"] is None and row["poses"] is None
    assert len(row["embedding"]) == 128 and row["run_id"] == one.run_id
    history = read_current(out, None)
    assert history.num_rows == first.listed  # still one current row per image


def test_a_malformed_row_fails_alone_in_a_model_stage(tmp_path: Path) -> None:
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 30), (i * 80, 20, 20)).save(tmp_path / f"{i}.png")
    uris = [str(tmp_path / f"{i}.png") for i in range(3)]
    batch = read_decode(pa.table({"image_id": [image_id(u) for u in uris], "uri": uris}),
                        max_pixels=10**6, short=64, long=128)
    widths = batch.column("dec_width").to_pylist()
    widths[1] += 1  # row 1's pixels no longer fit its declared size
    batch = batch.set_column(batch.schema.get_field_index("dec_width"), "dec_width",
                             pa.array(widths, pa.int32()))
    cfg = TaskConfig(task="embed", arch="tiny", weights="random")
    stage = ModelStage(cfg, TASK_TYPES["embedding"], drop_pixels=True)
    out = stage(batch)
    assert out.column("error_stage").to_pylist() == [None, "embed", None]
    assert out.column("error_type").to_pylist()[1] == "ValueError"
    emb = out.column("embedding").to_pylist()
    assert emb[1] is None and len(emb[0]) == len(emb[2]) == 128
    assert "pixels" not in out.column_names


@pytest.mark.parametrize(("pools", "cpus", "gpus"), [(4, 2, 0), (1, 2, 0), (4, 16, 0),
                                                     (4, 8, 1), (2, 32, 8), (4, 2, 3)])
def test_pools_leave_cpus_for_read_and_write_tasks(pools: int, cpus: float, gpus: float) -> None:
    plan = plan_pools(pools, cpus, gpus)
    n_pools = 1 if plan.fused else pools
    assert plan.size * n_pools * plan.num_cpus <= cpus - 1
    assert plan.size * n_pools * plan.num_gpus <= max(gpus, 0)


@pytest.mark.parametrize("gpus", [1, 2, 3, 7])
@pytest.mark.parametrize("tasks", [1, 2, 3, 4])
def test_every_gpu_gets_one_whole_gpu_actor_running_every_task(gpus: int, tasks: int) -> None:
    """No fractional GPUs (they pack into one GPU and cannot all run): one fused actor per
    GPU, so the actors sum to the GPUs there are, whatever the number of tasks."""
    plan = plan_pools(tasks, cpus=2 * gpus, gpus=gpus, node_cpus=2, max_gpus=2 * gpus)
    assert plan.fused and plan.num_gpus == 1.0 and plan.size == gpus
    assert plan.max_size == 2 * gpus  # grows with an autoscaling cluster
    assert plan.num_cpus <= 2 - 0.25  # room for a read task on its node


@pytest.mark.parametrize(("tasks", "cpus"), [(5, 2), (2, 2), (4, 16), (3, 64)])
def test_cpu_tasks_share_fused_actors_one_per_core(tasks: int, cpus: float) -> None:
    """On CPUs every asked model runs in each actor: as many actor processes to start as
    cores, not one per task, and no pool of a cheap model idling behind a slow one."""
    plan = plan_pools(tasks, cpus, 0)
    assert plan.fused and plan.size == cpus and plan.torch_threads == 1
    assert plan.num_gpus == 0 and plan.size * plan.num_cpus <= cpus - 1
    single = plan_pools(1, cpus, 0)
    assert not single.fused and single.size == plan.size


def test_no_actor_asks_for_more_cpus_than_a_node_has() -> None:
    plan = plan_pools(1, 3, 0, node_cpus=1)  # three 1-CPU nodes
    assert plan.num_cpus <= 0.75 and plan.size * plan.num_cpus <= 2  # room for a read task on each


@pytest.mark.slow  # ResNet-50 R-CNNs on CPU: ~45 s
def test_default_architectures_run_end_to_end(ray_local, tmp_path: Path) -> None:
    """The real default archs (ResNet-50 R-CNNs, ResNet-50 embedder), random weights."""
    from PIL import Image

    from models.registry import DEFAULT_ARCHS, DEFAULT_TASKS

    lake = tmp_path / "lake"
    lake.mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(lake / "a.jpg")
    Image.new("RGB", (50, 120), (30, 30, 200)).save(lake / "b.png")
    summary = run(AnnotateConfig(sources=(str(lake),), out=str(tmp_path / "out"),
                                 weights={t: "random" for t in DEFAULT_ARCHS}, image_size=96,
                                 batch_size=2, score_threshold=0.0))
    assert (summary.annotated, summary.errors) == (2, 0)
    results = read_results(tmp_path / "out")
    assert [m["arch"] for m in results.column("models").to_pylist()[0]] == [
        DEFAULT_ARCHS[t] for t in DEFAULT_TASKS]
    for row in results.to_pylist():
        assert len(row["embedding"]) == 2048
        assert all(rle_to_mask(i["mask"]).shape == (row["height"], row["width"])
                   for i in row["instances"])


@pytest.mark.slow  # a `ray start` cluster of its own: ~15 s; `make test-all` runs it
def test_cli_joins_an_existing_cluster_with_address(ray_local, tmp_path: Path) -> None:
    """`--address` runs the job on a cluster that is already up (here: this module's)."""
    from PIL import Image

    from tests.test_cli import lakelens

    (tmp_path / "lake").mkdir()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "lake" / "a.png")
    address = ray_local.get_runtime_context().gcs_address
    nodes_before = len(ray_local.nodes())
    proc = lakelens("annotate", str(tmp_path / "lake"), "--out", str(tmp_path / "out"),
                    "--tasks", "embed", "--weights", "random", "--arch", "embed=tiny",
                    "--address", address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 images listed (1 new" in proc.stdout and "1 annotated, 0 errors" in proc.stdout
    assert len(ray_local.nodes()) == nodes_before  # no second cluster was started
    bad = lakelens("annotate", str(tmp_path / "lake"), "--out", str(tmp_path / "o2"),
                   "--tasks", "embed", "--weights", "random", "--arch", "embed=tiny",
                   "--address", "127.0.0.1:1")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "cannot connect to Ray at 127.0.0.1:1" in bad.stderr


def test_shipped_default_weights_land_in_a_worker_cache_that_lacks_them(ray_local, tmp_path: Path) -> None:
    """A worker node without internet gets `default` weights from the driver: the bytes
    come through the object store into that node's own torch cache (here a worker whose
    TORCH_HOME is empty stands for the other node)."""
    import hashlib
    import os

    data = os.urandom(1 << 20)
    name = "resnet18-f37072fd.pth"
    node_b = tmp_path / "node-b-torch"

    @ray_local.remote(num_cpus=1, runtime_env={"env_vars": {"TORCH_HOME": str(node_b)}})
    def on_other_node(files: dict) -> tuple[str, str]:
        from models import weights as W
        from pipelines.cluster.weights import install_shipped

        install_shipped(files)
        path = W.cache_path(name)
        return str(path), hashlib.sha256(path.read_bytes()).hexdigest()

    path, digest = ray_local.get(on_other_node.remote({name: ray_local.put(data)}))
    assert path == str(node_b / "hub" / "checkpoints" / name)
    assert digest == hashlib.sha256(data).hexdigest()
