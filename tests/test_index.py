"""The similarity index: real FAISS, results tables with the real schema, clustered data."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from index.build import choose_factory, gpu_count, ground_truth, recall_at_k
from index.store import open_index
from models.errors import LakelensError
from pipelines.indexing import IndexBuildConfig, build, update
from tests.helpers import clustered_vectors, write_results

DIM = 32


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered_vectors(6000, DIM, seed=3)


def exact(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    return flat.search(q, k)


@pytest.mark.parametrize(("n", "dim", "budget", "expected"), [
    (5_000, 128, 2**34, "Flat"),
    (1_000_000, 256, 2**34, "IVF2048_HNSW32,PQ128x4fsr,Refine(SQfp16)"),
    (50_000_000, 512, 2**36, "IVF16384_HNSW32,PQ256x4fsr,Refine(SQfp16)"),
])
def test_auto_factory_choice(n: int, dim: int, budget: int, expected: str) -> None:
    choice = choose_factory(n, dim, memory_budget=budget)
    assert choice.factory == expected and str(n) in choice.reason


@pytest.mark.parametrize(("budget_gib", "codes"), [
    (16, "PQ128x4fsr,Refine(SQfp16)"),  # 5.4 GiB: half-precision re-rank
    (4, "PQ128x4fsr,Refine(SQ8)"),  # 3.1 GiB: 8-bit re-rank
    (1, "PQ128x4fsr"),  # 0.7 GiB: PQ codes alone
    (0.5, "PQ64x4fsr"),  # 0.4 GiB: half as many sub-quantizers
])
def test_a_smaller_memory_budget_picks_a_smaller_code(budget_gib: float, codes: str) -> None:
    n, dim = 10_000_000, 256
    choice = choose_factory(n, dim, memory_budget=int(budget_gib * 2**30))
    assert choice.factory == f"IVF8192_HNSW32,{codes}"
    assert f"within the {budget_gib:g} GiB budget" in choice.reason
    index = faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)  # a valid string
    assert faiss.extract_index_ivf(index).nlist == 8192
    tiny = choose_factory(n, dim, memory_budget=2**20)
    assert tiny.factory == "IVF8192_HNSW32,PQ64x4fsr" and "exceeds" in tiny.reason


def test_the_streamed_exact_answers_leave_out_the_querys_own_row() -> None:
    x = clustered_vectors(3000, 16, seed=4)
    rows = np.array([5, 700, 2999])
    truth = ground_truth(x[rows], (x[i:i + 512] for i in range(0, len(x), 512)), 10, "ip",
                         exclude=rows)
    _, full = exact(x, x[rows], 11)
    assert all(r not in t for r, t in zip(rows, truth, strict=True))
    assert truth.tolist() == [[i for i in row if i != r][:10] for r, row in zip(rows, full, strict=True)]


def test_above_the_flat_threshold_auto_builds_a_compressed_index_at_the_recall_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import index.build as B

    monkeypatch.setattr(B, "FLAT_MAX_ROWS", 10_000)  # what 100k vectors would get, at 30k
    n = 30_000
    x = clustered_vectors(n + 300, DIM, seed=7)
    data, held_out = x[:n], x[n:]  # same clusters; the held-out queries are never indexed
    write_results(tmp_path / "res", data)
    m = build(IndexBuildConfig(results=str(tmp_path / "res"), out=str(tmp_path / "idx"), gpu="off"))
    assert m["factory"] == f"IVF256_HNSW32,PQ{DIM // 2}x4fsr,Refine(SQfp16)", m["factory_reason"]
    assert m["factory_requested"] == "auto" and m["count"] == n and m["train_sample"] < n
    assert m["recall_at_10"] >= B.TARGET_RECALL + B.TUNE_MARGIN
    assert set(m["search_params"]) == {"nprobe", "quantizer_efSearch", "k_factor"}
    idx = open_index(tmp_path / "idx")
    assert isinstance(faiss.downcast_index(idx.index), faiss.IndexRefine)
    assert faiss.extract_index_ivf(idx.index).nprobe == m["search_params"]["nprobe"]
    found = np.array([[int(i[3:]) for i in ids] for ids in idx.search(held_out, 10).image_ids])
    assert recall_at_k(found, exact(data, held_out, 10)[1]) >= 0.95
    assert idx.search_ids(["img0000042"], 3).image_ids[0][0] == "img0000042"  # from fp16 vectors
    # A budget below the half-precision re-rank (30k x 16 B of PQ codes and ids fit) picks
    # PQ codes alone; search_ids reconstructs from the codes it has.
    small = build(IndexBuildConfig(results=str(tmp_path / "res"), out=str(tmp_path / "small"),
                                   gpu="off", memory_budget_gb=1.2e6 / 2**30))
    assert small["factory"] == f"IVF256_HNSW32,PQ{DIM // 2}x4fsr", small["factory_reason"]
    with pytest.raises(LakelensError, match="query by vector or image"):
        open_index(tmp_path / "small").search_ids(["img0000042"], 3)


def test_small_index_is_flat_and_equals_exact_search(data: np.ndarray, tmp_path: Path) -> None:
    write_results(tmp_path / "res", data, null_rows=5)
    manifest = build(IndexBuildConfig(results=str(tmp_path / "res"), out=str(tmp_path / "idx")))
    assert manifest["factory"] == "Flat" and manifest["count"] == len(data)
    assert manifest["recall_at_10"] == 1.0
    idx = open_index(tmp_path / "idx")
    q = data[:50]
    found = idx.search(q, 10)
    scores, rows = exact(data, q, 10)
    # Row numbers follow the table's file order; compare by image id.
    assert found.image_ids == [[f"img{r:07d}" for r in row] for row in rows]
    np.testing.assert_allclose(np.stack(found.scores), scores, rtol=1e-5)
    assert found.image_ids[0][0] == "img0000000" and found.uris[0][0] == "/lake/img0000000.jpg"


def test_ivf_index_reaches_the_recall_target(data: np.ndarray, tmp_path: Path) -> None:
    write_results(tmp_path / "res", data)
    manifest = build(IndexBuildConfig(results=str(tmp_path / "res"), out=str(tmp_path / "idx"),
                                      factory="IVF64,Flat", gpu="off"))
    assert manifest["search_params"]["nprobe"] >= 1 and manifest["recall_at_10"] >= 0.95
    idx = open_index(tmp_path / "idx")
    q = clustered_vectors(6200, DIM, seed=3)[6000:]  # same clusters, not in the index
    found = np.full((len(q), 10), -1)
    for i, ids in enumerate(idx.search(q, 10).image_ids):
        found[i, :len(ids)] = [int(x[3:]) for x in ids]  # img0000042 -> data row 42
    assert recall_at_k(found, exact(data, q, 10)[1]) >= 0.9


def test_manifest_round_trip(data: np.ndarray, tmp_path: Path) -> None:
    write_results(tmp_path / "res", data, embedder=("resnet18", "random:seed0"))
    built = build(IndexBuildConfig(results=str(tmp_path / "res"), out=str(tmp_path / "idx"),
                                   metric="l2"))
    name = (tmp_path / "idx" / "CURRENT").read_text().strip()
    assert name == built["version"] and name.startswith("v1-")
    on_disk = json.loads((tmp_path / "idx" / name / "manifest.json").read_text())
    [segment] = on_disk.pop("segments")
    assert on_disk == {**built, "format_version": 2}
    for key in ("factory", "dim", "metric", "count", "embedder", "table", "table_version", "build_s",
                "lakelens_version", "recall_at_10"):
        assert key in on_disk, key
    assert on_disk["embedder"] == {"arch": "resnet18", "weights": "random:seed0", "spec": "random"}
    idx = open_index(tmp_path / "idx")
    assert (idx.dim, len(idx), idx.manifest["metric"]) == (DIM, len(data), "l2")
    assert idx.search_ids(["img0000042"], 3).image_ids[0][0] == "img0000042"
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(
        ["CURRENT", "_lakelens", name, "segments"])
    assert sorted(p.name for p in (tmp_path / "idx" / name).iterdir()) == ["manifest.json"]
    assert (segment["start"], segment["rows"]) == (0, len(data))
    assert sorted(p.name for p in (tmp_path / "idx" / segment["dir"]).iterdir()) == [
        "ids-00000.parquet", "index.faiss", "trained.faiss"]


def test_update_equals_a_rebuild_of_the_table(data: np.ndarray, tmp_path: Path) -> None:
    a, b = data[:4000], data[4000:]
    lake = tmp_path / "lake"
    write_results(lake, a)
    build(IndexBuildConfig(results=str(lake), out=str(tmp_path / "inc")))
    # Night two: 2000 new images, and 100 old ones that changed (same id, new bytes).
    changed_ids = [f"img{i:07d}" for i in range(100)]
    changed = clustered_vectors(100, DIM, seed=11)
    new_ids = [f"img{i:07d}" for i in range(4000, 6000)]
    write_results(lake, np.concatenate([b, changed]), ids=new_ids + changed_ids,
                  hashes=[f"h-{i}" for i in new_ids] + [f"new-{i}" for i in changed_ids],
                  run_id="run-b")
    m = update(str(tmp_path / "inc"), str(lake))
    up = m["last_update"]
    assert (up["added"], up["replaced"], m["count"], m["vectors"]) == (2100, 100, 6000, 6100)
    assert m["version"].startswith("v2-")
    assert (tmp_path / "inc" / "CURRENT").read_text().strip() == m["version"]
    # the night is one new segment; the build's segment is left as it was
    assert [(s["start"], s["rows"]) for s in m["segments"]] == [(0, 4000), (4000, 2100)]
    build(IndexBuildConfig(results=str(lake), out=str(tmp_path / "full")))
    inc, full = open_index(tmp_path / "inc"), open_index(tmp_path / "full")
    q = np.concatenate([data[::97], changed[:10]])
    r_inc, r_full = inc.search(q, 10), full.search(q, 10)
    assert r_inc.image_ids == r_full.image_ids
    np.testing.assert_allclose(np.stack(r_inc.scores), np.stack(r_full.scores), rtol=1e-5)
    # The changed image is found by its new vector, never by its old one, and dead rows
    # are excluded inside the search: k live hits come back.
    assert inc.search(changed[:1], 1).image_ids[0] == ["img0000000"]
    assert "img0000000" not in inc.search(data[:1], 1).image_ids[0]
    assert all(len(ids) == 10 for ids in inc.search(data[:100], 10).image_ids)
    again = update(str(tmp_path / "inc"), str(lake))
    assert again["last_update"]["unchanged"] and again["version"] == m["version"]


def test_update_rebuilds_when_most_vectors_are_dead(data: np.ndarray, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    write_results(lake, data[:1000])
    build(IndexBuildConfig(results=str(lake), out=str(tmp_path / "idx")))
    write_results(lake, data[1000:1600], ids=[f"img{i:07d}" for i in range(600)], run_id="run-b")
    m = update(str(tmp_path / "idx"), str(lake))
    assert "replaced ones" in m["last_update"]["rebuilt"]
    assert (m["count"], m["vectors"]) == (1000, 1000)  # rebuilt: no dead rows left
    idx = open_index(tmp_path / "idx")
    assert idx.search(data[1000:1001], 1).image_ids[0] == ["img0000000"]


def test_a_crash_mid_update_leaves_the_old_index_answering(data: np.ndarray, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    lake = tmp_path / "lake"
    write_results(lake, data[:3000])
    build(IndexBuildConfig(results=str(lake), out=str(tmp_path / "idx")))
    before = open_index(tmp_path / "idx").search(data[:20], 5).image_ids
    write_results(lake, data[3000:], ids=[f"img{i:07d}" for i in range(3000, 6000)], run_id="run-b")
    first = (tmp_path / "idx" / "CURRENT").read_text().strip()
    # A real update in a child process, SIGKILLed after writing the new version, before
    # switching CURRENT to it.
    code = ("import time\n"
            "from index import versions\n"
            "def stop(*a):\n"
            "    print('WRITTEN', flush=True); time.sleep(60)\n"
            "versions._switch_local = stop\n"
            "from pipelines.indexing import update\n"
            f"update({str(tmp_path / 'idx')!r}, {str(lake)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITTEN"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.1)
    orphans = [p.name for p in (tmp_path / "idx").glob("v2-*")]
    assert len(orphans) == 1  # written whole, never switched in
    assert (tmp_path / "idx" / "CURRENT").read_text().strip() == first
    assert open_index(tmp_path / "idx").search(data[:20], 5).image_ids == before
    m = update(str(tmp_path / "idx"), str(lake))  # the next update finishes the job
    assert m["count"] == 6000 and m["version"].startswith("v2-") and m["version"] != orphans[0]
    assert not (tmp_path / "idx" / orphans[0]).exists()  # the killed writer's version is collected
    assert open_index(tmp_path / "idx").search(data[3000:3001], 1).image_ids[0] == ["img0003000"]


def test_bad_inputs_are_clear_errors(data: np.ndarray, tmp_path: Path) -> None:
    write_results(tmp_path / "res", data[:500])
    build(IndexBuildConfig(results=str(tmp_path / "res"), out=str(tmp_path / "idx")))
    idx = open_index(tmp_path / "idx")
    with pytest.raises(LakelensError, match="dim 32"):
        idx.search(np.zeros((2, 16), np.float32))
    with pytest.raises(LakelensError, match="not in this index"):
        idx.search_ids(["nope"])
    with pytest.raises(LakelensError, match="k must be >= 1"):
        idx.search(data[:1], 0)
    with pytest.raises(LakelensError, match="does not exist"):
        open_index(tmp_path / "missing")
    import shutil

    shutil.copytree(tmp_path / "idx", tmp_path / "broken")
    for seg in (tmp_path / "broken" / "segments").iterdir():
        (seg / "index.faiss").write_bytes(b"not faiss")
    with pytest.raises(LakelensError, match="corrupt"):
        open_index(tmp_path / "broken")
    with pytest.raises(LakelensError, match="no CURRENT"):
        open_index(tmp_path / "res")
    with pytest.raises(LakelensError, match="holds no lakelens table"):
        build(IndexBuildConfig(results=str(tmp_path / "idx"), out=str(tmp_path / "y")))
    with pytest.raises(LakelensError, match="not a valid FAISS factory"):
        build(IndexBuildConfig(results=str(tmp_path / "res"), out=str(tmp_path / "x"),
                               factory="IVF,Nonsense"))


def test_another_embedder_or_dim_is_refused_by_update(tmp_path: Path) -> None:
    write_results(tmp_path / "one", clustered_vectors(50, 16), run_id="r1")
    build(IndexBuildConfig(results=str(tmp_path / "one"), out=str(tmp_path / "i3")))
    write_results(tmp_path / "one", clustered_vectors(50, 16, seed=2), run_id="r2",
                  embedder=("resnet18", "random:seed0"))
    with pytest.raises(LakelensError, match="rebuild instead"):
        update(str(tmp_path / "i3"), str(tmp_path / "one"))
    write_results(tmp_path / "wide", clustered_vectors(50, 32), run_id="r1")
    with pytest.raises(LakelensError, match="dim 32"):
        update(str(tmp_path / "i3"), str(tmp_path / "wide"))


def test_gpu_on_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    if gpu_count() > 0:
        pytest.skip("this machine has a GPU FAISS can use")
    write_results(tmp_path / "res", clustered_vectors(50, 16))
    with pytest.raises(LakelensError, match="--gpu on"):
        build(IndexBuildConfig(results=str(tmp_path / "res"), out=str(tmp_path / "i"), gpu="on"))


@pytest.mark.gpu
def test_gpu_build_matches_cpu_recall(data: np.ndarray, tmp_path: Path) -> None:
    if gpu_count() == 0:
        pytest.skip("FAISS sees no GPU (faiss-cpu installed)")
    write_results(tmp_path / "res", data)
    m = build(IndexBuildConfig(results=str(tmp_path / "res"), out=str(tmp_path / "g"),
                               factory="IVF64,Flat", gpu="on"))
    assert m["built_on"] == "gpu" and m["recall_at_10"] >= 0.95


def test_query_images_with_the_checkpoint_the_index_names(tmp_path: Path) -> None:
    from PIL import Image

    from models.embedding import build_embedder
    from models.weights import read_checkpoint, save_checkpoint

    model, _, _ = build_embedder("tiny", weights="random")
    ckpt = tmp_path / "embedder.pt"
    save_checkpoint(ckpt, {k: v * 1.5 for k, v in model.state_dict().items()}, {"arch": "tiny"})
    wid = read_checkpoint(str(ckpt)).weights_id
    paths = []
    for i, color in enumerate(((250, 20, 20), (20, 250, 20), (20, 20, 250))):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (80, 60), color).save(paths[-1])
    from index.embed import embed_files

    embedder = {"arch": "tiny", "weights": wid, "spec": str(ckpt)}
    vecs = embed_files(paths, embedder)
    write_results(tmp_path / "res", vecs, ids=["r", "g", "b"], embedder=("tiny", wid),
                  spec=str(ckpt))
    build(IndexBuildConfig(results=str(tmp_path / "res"), out=str(tmp_path / "idx")))
    idx = open_index(tmp_path / "idx")
    assert [ids[0] for ids in idx.search_images(paths[::-1], 1).image_ids] == ["b", "g", "r"]
    save_checkpoint(ckpt, model.state_dict(), {"arch": "tiny"})  # the file changed since
    with pytest.raises(LakelensError, match="but the index was built with"):
        idx.search_images(paths, 1)


def test_recall_at_k_on_a_hand_made_case() -> None:
    from index.evaluate import recall_at_k

    # Unit vectors at 0, 10, 20 and 90 degrees, labels a, b, a, b. Nearest other of each:
    # 0->1 (b), 1->0 or 2 (both a), 2->1 (b), 3->2 (a): no query hits at K=1.
    angles = np.radians([0.0, 10.0, 20.0, 90.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    r = recall_at_k(x, [0, 1, 0, 1], ks=(1, 2, 3))
    assert r[1] == 0.0
    assert r[2] == pytest.approx(0.75)  # 0: {1, 2} hits a; 1: {0, 2} no b; 2: {1, 0} hits a; 3: {2, 1} hits b
    assert r[3] == pytest.approx(1.0)  # query 1 reaches 3 (b) at K=3
    with pytest.raises(LakelensError, match="K must be"):
        recall_at_k(x, [0, 1, 0, 1], ks=(4,))


def test_id_map_finds_rows_without_python_objects_per_row() -> None:
    """Hex image ids (lakelens's own) take the vectorised path, other ids the hashed one;
    both find live rows, miss dead and unknown ids, and agree with a dict."""
    import hashlib

    import pyarrow as pa

    from index.idmap import IdMap

    hexes = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(5000)]
    names = [f"img{i:07d}" for i in range(5000)]
    live = np.ones(5000, bool)
    live[::7] = False
    for ids in (hexes, names):
        m = IdMap(pa.array(ids), pa.array([f"/lake/{i}.jpg" for i in ids]), live)
        assert m.hex == (ids is hexes)
        truth = {i: r for r, i in enumerate(ids) if live[r]}
        query = ids[::3] + ["0" * 32, "nope", ids[0].upper()]
        rows = m.rows_of(pa.array(query))
        assert rows.tolist() == [truth.get(i, -1) for i in query]
        assert [m.row(i) for i in query[:50]] == [truth.get(i) for i in query[:50]]
        assert m.uris[int(rows[1])].as_py() == f"/lake/{query[1]}.jpg"


def test_search_with_parameters_survives_faiss_torch_utils(tmp_path: Path) -> None:
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which swaps every
    Index.search in the process for one that takes no search parameters."""
    import faiss.contrib.torch_utils  # noqa: F401

    from pipelines.indexing import IndexBuildConfig, build
    from tests.helpers import clustered_vectors, write_results

    data = clustered_vectors(2000, 16)
    write_results(tmp_path / "out", data)
    build(IndexBuildConfig(results=str(tmp_path / "out"), out=str(tmp_path / "index"), factory="IVF8,Flat"))
    idx = open_index(tmp_path / "index")
    allow = np.zeros(2000, bool)
    allow[:20] = True
    found = idx.search(data[:2], 5, allow=allow, nprobe=1)
    assert all(len(r) == 5 and (r < 20).all() for r in found.rows)
