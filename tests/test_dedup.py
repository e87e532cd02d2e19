"""Near-duplicates: nightly edges through a real index into a real Delta table (exactly once
across reruns and a crash between the index switch and the edges' commit), groups that
merge across nights, the `lakelens dedup` command, erasure by `forget`, and the
`/images/{id}/duplicates` endpoint on a real server."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from PIL import Image

from pipelines import dedup, indexing
from pipelines.lake import upkeep
from pipelines.serve.engine import ServeConfig
from tests.helpers import free_port, write_results
from tests.test_cli import _one_line_error, lakelens

DIM = 16


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def basis(i: int) -> np.ndarray:
    return np.eye(DIM, dtype=np.float32)[i]


# Night one: two pairs of near-duplicates whose groups are 0.9 apart (below the default
# threshold, above the floor), and six distinct images (orthogonal to everything).
A = basis(0)
B = unit(0.9 * basis(0) + np.sqrt(1 - 0.81) * basis(1))  # A . B = 0.9
NIGHT_ONE = {"a1": A, "a2": unit(A + 0.05 * basis(2)), "b1": B, "b2": unit(B + 0.05 * basis(3)),
             **{f"x{i}": basis(4 + i) for i in range(6)}}
C = unit(A + B)  # night two: 0.975 to both groups' first images, so it joins them


def night(out: Path, index: Path, vectors: dict[str, np.ndarray], run_id: str) -> dict:
    """What `annotate --index` does after its commits: the index synced, then the edges."""
    write_results(out, np.stack(list(vectors.values())), ids=list(vectors), run_id=run_id)
    indexing.sync(str(index), str(out))
    return dedup.nightly(str(out), str(index), run_id=run_id)


def edges_of(out: Path) -> list[tuple[str, str, int]]:
    t = DeltaTable(str(out / "dedup")).to_pyarrow_table()
    return sorted(zip(t.column("image_id").to_pylist(), t.column("neighbour_id").to_pylist(),
                      t.column("table_version").to_pylist(), strict=True))


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("dedup")
    out, index = root / "out", root / "index"
    first = night(out, index, NIGHT_ONE, "night-1")
    after_one = dedup.groups(str(out))
    second = night(out, index, {"c": C}, "night-2")
    return root, out, index, first, after_one, second


def test_groups_merge_across_two_nights(two_nights) -> None:
    root, out, index, first, after_one, second = two_nights
    # night one: each pair found once, from the later image of each pair of the total order
    assert first["searched"] == 10 and first["from_table_version"] == -1
    pairs = {frozenset(e[:2]) for e in edges_of(out) if e[2] == first["table_version"]}
    assert frozenset({"a1", "a2"}) in pairs and frozenset({"b1", "b2"}) in pairs
    assert not any(i.startswith("x") for p in pairs for i in p)  # distinct: below the floor
    assert after_one.summary() | {"edges": 0} == {"threshold": dedup.DEFAULT_THRESHOLD, "groups": 2,
                                                  "images_in_groups": 4, "largest_group": 2, "edges": 0}
    assert after_one.group_of("a2") == "a1" and after_one.group_of("b2") == "b1"
    assert after_one.group_of("x0") is None
    # night two searched only its one new image; its edges link both groups into one
    assert second["searched"] == 1 and second["from_table_version"] == first["table_version"]
    assert {e[0] for e in edges_of(out) if e[2] == second["table_version"]} == {"c"}
    merged = dedup.groups(str(out))
    assert merged.summary()["groups"] == 1 and merged.summary()["largest_group"] == 5
    assert {r["image_id"]: r["group_id"] for r in merged.to_table().to_pylist()} == {
        i: "a1" for i in ("a1", "a2", "b1", "b2", "c")}
    dups = merged.duplicates("c")
    assert [d["image_id"] for d in dups][:2] in (["a1", "b1"], ["b1", "a1"])
    assert dups[0]["similarity"] == pytest.approx(float(C @ A), abs=1e-5)
    # at 0.99 only the tight pairs remain, each its own group again
    assert dedup.groups(str(out), 0.99).summary()["groups"] == 2


def test_edges_are_written_once_across_reruns(two_nights, tmp_path: Path) -> None:
    _, out, index, first, _, second = two_nights
    before = edges_of(out)
    version = DeltaTable(str(out / "dedup")).version()
    again = dedup.nightly(str(out), str(index), run_id="night-2")  # a rerun of the same run
    other = dedup.nightly(str(out), str(index), run_id="night-3")  # a later run, nothing new
    assert again["unchanged"] and other["unchanged"]
    assert edges_of(out) == before and DeltaTable(str(out / "dedup")).version() == version
    assert len(before) == len(set(before))


def test_changed_and_vanished_images_lose_their_edges(tmp_path: Path) -> None:
    out, index = tmp_path / "out", tmp_path / "index"
    night(out, index, NIGHT_ONE, "night-1")
    # a2's bytes change into something else: its old edge no longer counts; the night that
    # indexed the change searched it again as new
    done = night(out, index, {"a2": basis(15)}, "night-2")
    assert done["searched"] == 1
    found = dedup.groups(str(out))
    assert found.group_of("a2") is None and found.group_of("a1") is None
    assert found.group_of("b2") == "b1"
    # ...and it comes back as a duplicate of a1: a new edge, found once
    night(out, index, {"a2": unit(A + 0.01 * basis(2))}, "night-3")
    assert dedup.groups(str(out)).group_of("a2") == "a1"
    assert sum(1 for e in edges_of(out) if set(e[:2]) == {"a1", "a2"}) == 2  # nights one and three


def test_forget_erases_the_edges_naming_an_image(tmp_path: Path) -> None:
    out, index = tmp_path / "out", tmp_path / "index"
    night(out, index, NIGHT_ONE, "night-1")
    night(out, index, {"c": C}, "night-2")
    assert any("c" in e[:2] for e in edges_of(out))
    every = edges_of(out)
    naming = [e for e in every if {"c", "b2"} & set(e[:2])]
    assert len(naming) >= 5  # c's four, and b2's to b1 (and to a1, a2 below the threshold)
    ids = tmp_path / "ids.txt"
    ids.write_text("c\nb2\n")
    result = upkeep.forget(str(out), ids_file=str(ids))
    assert result["upkeep"]["dedup_edges_deleted"] == len(naming)
    assert f"{len(naming)} near-duplicate edges deleted" in upkeep.describe(result)
    left = edges_of(out)
    assert not [e for e in left if {"c", "b2"} & set(e[:2])]
    assert ("a2", "a1", 1) in left and left == [e for e in every if e not in naming]  # the others stay
    # no file on disk holds them any more: the replaced files are vacuumed
    files = list((out / "dedup").glob("*.parquet"))
    assert files
    for f in files:
        t = pq.read_table(f)
        assert not set(t.column("image_id").to_pylist() + t.column("neighbour_id").to_pylist()) & {"c", "b2"}
    assert dedup.groups(str(out)).summary()["groups"] == 1  # a1, a2 only


def test_dedup_command_writes_groups_and_refuses_bad_input(two_nights, tmp_path: Path) -> None:
    _, out, _, _, _, _ = two_nights
    proc = lakelens("dedup", str(out), "--out", str(tmp_path / "groups.parquet"))
    assert proc.returncode == 0, proc.stderr
    assert (f"near-duplicates in {out} at similarity >= {dedup.DEFAULT_THRESHOLD:g}: 1 groups, 5 images "
            "in groups, largest group 5") in proc.stdout
    rows = pq.read_table(tmp_path / "groups.parquet").to_pylist()
    assert sorted((r["image_id"], r["uri"], r["group_id"], r["group_size"]) for r in rows) == [
        (i, f"/lake/{i}.jpg", "a1", 5) for i in ("a1", "a2", "b1", "b2", "c")]
    sim = {r["image_id"]: r["similarity"] for r in rows}
    assert sim["a1"] == pytest.approx(1.0) and sim["b1"] == pytest.approx(0.9, abs=1e-5)
    _one_line_error(lakelens("dedup", str(out), "--threshold", "0.5"), "--threshold 0.5")
    bare = tmp_path / "bare"
    write_results(bare, np.stack([A]), ids=["a1"])
    _one_line_error(lakelens("dedup", str(bare)), "no near-duplicate table")


def test_duplicates_endpoint_on_a_real_server(two_nights, tmp_path: Path) -> None:
    from tests.test_serve import Server

    _, out, index, _, _, _ = two_nights
    server = Server(ServeConfig(index=str(index), port=free_port(), reload_s=0))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            r = client.get("/images/c/duplicates")
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body) == {"image_id", "group_id", "threshold", "duplicates"}
            assert (body["image_id"], body["group_id"], body["threshold"]) == ("c", "a1",
                                                                              dedup.DEFAULT_THRESHOLD)
            assert {d["image_id"] for d in body["duplicates"]} == {"a1", "a2", "b1", "b2"}
            assert all(set(d) == {"image_id", "uri", "similarity"} for d in body["duplicates"])
            sims = [d["similarity"] for d in body["duplicates"]]
            assert sims == sorted(sims, reverse=True) and sims[0] == pytest.approx(0.9747, abs=1e-3)
            assert body["duplicates"][0]["uri"] in ("/lake/a1.jpg", "/lake/b1.jpg")
            tight = client.get("/images/a2/duplicates", params={"threshold": 0.99}).json()
            assert (tight["group_id"], [d["image_id"] for d in tight["duplicates"]]) == ("a1", ["a1"])
            alone = client.get("/images/x3/duplicates").json()
            assert (alone["group_id"], alone["duplicates"]) == (None, [])
            missing = client.get("/images/nope/duplicates")
            assert missing.status_code == 404 and "not in the index" in missing.json()["error"]
            bad = client.get("/images/c/duplicates", params={"threshold": 0.2})
            assert bad.status_code == 400 and "threshold=0.2: a cosine similarity in" in bad.json()["error"]
    finally:
        server.stop()
    # a service whose table has no dedup table: 404 with one line
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("dedup"))
    server = Server(ServeConfig(index=str(index), table=str(bare), port=free_port(), reload_s=0))
    try:
        r = httpx.get(f"{server.url}/images/c/duplicates", timeout=30)
        assert r.status_code == 404 and "no near-duplicate table" in r.json()["error"]
        assert "\n" not in r.json()["error"]
    finally:
        server.stop()


def _images(folder: Path, n: int, *, seed: int) -> list[Path]:
    """Distinct images (blocky noise), one of a kind each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        paths.append(folder / f"s{seed}-{i:03d}.png")
        Image.fromarray(pixels).resize((64, 48), Image.Resampling.NEAREST).save(paths[-1])
    return paths


@pytest.mark.slow  # two annotate runs on a Ray of its own (~30 s on 2 loaded cores); the default
# suite covers annotate's edges in tests/test_nightly.py, on runs it makes anyway
def test_a_crash_between_the_index_switch_and_the_edges_is_caught_up_once(ray_local, tmp_path: Path) -> None:
    from pipelines.annotate import run
    from pipelines.config import AnnotateConfig

    lake, out, index = tmp_path / "lake", tmp_path / "out", tmp_path / "index"
    originals = _images(lake, 6, seed=1)
    copy = lake / "copy-of-0.png"
    shutil.copy(originals[0], copy)  # the same bytes under another name: similarity 1
    cfg = AnnotateConfig(sources=(str(lake),), out=str(out), index=str(index), tasks=("embed",),
                         weights={"embed": "random"}, archs={"embed": "tiny"})
    run(dataclasses.replace(cfg, index=None))  # the table's rows
    indexing.sync(str(index), str(out))  # the index switched; the run "died" here
    rerun = run(cfg)  # nothing to annotate; the index is current; the edges catch up
    assert rerun.annotated == 0 and rerun.index["dedup"]["searched"] == 7
    assert "near-duplicates: 7 new images searched" in rerun.index["summary"]
    edges = edges_of(out)
    assert len(edges) == len(set(edges)) == rerun.index["dedup"]["edges"]
    groups = dedup.groups(str(out), 0.999).to_table().to_pylist()
    assert sorted(r["uri"] for r in groups) == sorted([str(originals[0]), str(copy)])
    again = run(cfg)  # and once only
    assert again.index["dedup"]["unchanged"] and edges_of(out) == edges
