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


# Night one: two pairs of near-duplicates whose groups are 0.92 apart (below the default
# threshold, above the floor), and six distinct images (orthogonal to everything).
A = basis(0)
B = unit(0.92 * basis(0) + np.sqrt(1 - 0.92**2) * basis(1))  # A . B = 0.92
NIGHT_ONE = {"a1": A, "a2": unit(A + 0.05 * basis(2)), "b1": B, "b2": unit(B + 0.05 * basis(3)),
             **{f"x{i}": basis(4 + i) for i in range(6)}}
C = unit(A + B)  # night two: 0.98 to both groups' first images, so it joins them


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
    assert sim["a1"] == pytest.approx(1.0) and sim["b1"] == pytest.approx(0.92, abs=1e-5)
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
            assert sims == sorted(sims, reverse=True) and sims[0] == pytest.approx(float(C @ A), abs=1e-5)
            assert body["duplicates"][0]["uri"] in ("/lake/a1.jpg", "/lake/b1.jpg")
            tight = client.get("/images/a2/duplicates", params={"threshold": 0.99}).json()
            assert (tight["group_id"], [d["image_id"] for d in tight["duplicates"]]) == ("a1", ["a1"])
            alone = client.get("/images/x3/duplicates").json()
            assert (alone["group_id"], alone["duplicates"]) == (None, [])
            missing = client.get("/images/nope/duplicates")
            assert missing.status_code == 404 and "not in the index" in missing.json()["error"]
            bad = client.get("/images/c/duplicates", params={"threshold": 0.2})
            assert bad.status_code == 400 and "threshold=0.2: a cosine similarity in" in bad.json()["error"]
        _page_shows_the_duplicates(server.url, "c", tmp_path)
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


def _page_shows_the_duplicates(url: str, image_id: str, tmp_path: Path) -> None:
    """In the real browser: opening an image shows its duplicates beside it, each with its
    similarity, best first (the web page's panel, pipelines/serve/page.html)."""
    from selenium.webdriver.common.by import By

    from tests.test_serve import chromium_driver
    from tests.test_serve_page import waiter

    browser = chromium_driver(tmp_path / "chromium")
    try:
        browser.get(f"{url}/?image_id={image_id}&k=3")
        panel = browser.find_element(By.ID, "duplicates")
        waiter(browser).until(lambda b: panel.get_attribute("data-state") == "shown"
                              and panel.get_attribute("data-image-id") == image_id)
        assert panel.is_displayed()
        items = browser.find_elements(By.CSS_SELECTOR, "#dup-list .dup")
        assert {i.get_attribute("data-image-id") for i in items} == {"a1", "a2", "b1", "b2"}
        sims = [float(i.find_element(By.CSS_SELECTOR, ".similarity").text) for i in items]
        assert sims == sorted(sims, reverse=True) and sims[0] >= dedup.DEFAULT_THRESHOLD
        browser.save_screenshot(str(tmp_path / "page-duplicates.png"))
    finally:
        browser.quit()


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


# -- calibration --------------------------------------------------------------------------

PHOTOMETRIC = ("jpeg", "resize", "brightness")  # what the default threshold is calibrated for
GEOMETRIC = ("crop", "flip")  # measured and reported (README), beyond the demo embedder


def _encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def near_duplicates(data: bytes, rng: np.random.Generator) -> dict[str, bytes]:
    """Five near-duplicates of an image: JPEG re-encoded at quality 40-75, resized to
    50-90 %, cropped to 95 % of each side (random offset), mirrored, brightness +-10 %."""
    import io

    from PIL import ImageEnhance

    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    s = rng.uniform(0.5, 0.9)
    cw, ch = round(w * 0.95), round(h * 0.95)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return {"jpeg": _encoded(im, "JPEG", quality=int(rng.integers(40, 76))),
            "resize": _encoded(im.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)),
            "crop": _encoded(im.crop((x0, y0, x0 + cw, y0 + ch))),
            "flip": _encoded(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
            "brightness": _encoded(ImageEnhance.Brightness(im).enhance(float(rng.choice([0.9, 1.1]))))}


def calibration_set(lake: list[Path], originals: int, kinds: tuple[str, ...], *, seed: int = 1
                    ) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """The first `originals` images of the lake with their near-duplicates of `kinds`, and
    the rest of the lake as distinct images: (encoded images, group per image, kind)."""
    rng = np.random.default_rng(seed)
    images, group, kind = [], [], []
    for g, path in enumerate(lake):
        data = path.read_bytes()
        images.append(data)
        group.append(g)
        kind.append("original")
        if g < originals:
            for k, dup in near_duplicates(data, rng).items():
                if k in kinds:
                    images.append(dup)
                    group.append(g)
                    kind.append(k)
    return images, np.asarray(group), np.asarray(kind)


def embed(images: list[bytes], weights: str) -> np.ndarray:
    """What annotate stores: decoded to the embedder's size, embedded, unit vectors."""
    from models.decode import decode_image
    from models.embedding import decode_sizes
    from models.predict import EmbeddingPredictor

    short, long = decode_sizes("tiny")
    predictor = EmbeddingPredictor("tiny", weights=weights)
    return np.stack(predictor([decode_image(d, short=short, long=long).pixels for d in images]))


def pair_scores(same_pred: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """(recall, precision) over every pair of images: a pair is a duplicate when both come
    from one original; predicted when `same_pred` (upper-triangle pairs) says so."""
    i, j = np.triu_indices(len(group), 1)
    truth = group[i] == group[j]
    hit = (same_pred & truth).sum()
    return hit / max(truth.sum(), 1), hit / max(same_pred.sum(), 1)


def best_tradeoff(vectors: np.ndarray, group: np.ndarray) -> float:
    """The largest min(recall, precision) over every pair at any threshold."""
    i, j = np.triu_indices(len(group), 1)
    sims = np.einsum("nd,nd->n", vectors[i], vectors[j])
    return max(min(pair_scores(sims >= t, group)) for t in np.arange(0.80, 1.0, 0.0025))


def system_scores(tmp: Path, vectors: np.ndarray, group: np.ndarray, kind: np.ndarray,
                  threshold: float) -> tuple[float, float]:
    """Pair (recall, precision) of the groups the product finds: the originals and the
    distinct images indexed on night one, the near-duplicates on night two, each night's
    edges through the real index, groups by union-find at `threshold`."""
    ids = [f"img{n:05d}" for n in range(len(group))]
    first = np.flatnonzero(kind == "original")
    second = np.flatnonzero(kind != "original")
    out, index = tmp / "out", tmp / "index"
    night(out, index, {ids[n]: vectors[n] for n in first}, "night-1")
    night(out, index, {ids[n]: vectors[n] for n in second}, "night-2")
    found = dedup.groups(str(out), threshold).to_table()
    label = np.arange(len(group)) + len(group)  # in no group: a label of its own
    at = {i: n for n, i in enumerate(ids)}
    for member, gid in zip(found.column("image_id").to_pylist(), found.column("group_id").to_pylist(),
                           strict=True):
        label[at[member]] = at[gid]
    i, j = np.triu_indices(len(group), 1)
    return pair_scores(label[i] == label[j], group)


@pytest.fixture(scope="module")
def synth_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's synthetic lake (write_dataset, as `lakelens demo` makes it, 1000 images):
    the embedder trains on its train split; the val split is the lake the duplicates come
    from (held-out image families)."""
    from pipelines.synth import write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, images=1000, seed=0, val_fraction=0.1)
    return root


def test_random_weights_are_no_embedder_for_near_duplicates(synth_lake: Path) -> None:
    """Why the calibration uses a trained embedder: with random weights every synthetic
    scene looks like every other (dark noisy backgrounds), so distinct images all pass the
    floor (the edges would grow with the lake), and with crops and flips among the
    near-duplicates no threshold reaches 0.95 / 0.95."""
    lake = sorted((synth_lake / "val" / "images").glob("*.jpg"))[:40]
    images, group, kind = calibration_set(lake, 20, PHOTOMETRIC + GEOMETRIC)
    assert len(images) == 20 * 6 + 20
    vectors = embed(images, "random")
    distinct = vectors[kind == "original"]
    sims = distinct @ distinct.T
    assert np.median(sims[np.triu_indices(len(distinct), 1)]) > dedup.FLOOR
    assert best_tradeoff(vectors, group) < 0.95


@pytest.mark.slow  # trains the demo's embedder (50 epochs on 900 images: minutes on 2 cores)
def test_the_calibrated_threshold_finds_near_duplicates(synth_lake: Path, tmp_path: Path) -> None:
    """README "Near-duplicates": the demo's embedder, trained as the demo trains it; 50 of
    the val lake's images with three near-duplicates each, among 50 distinct images."""
    from tests.helpers import train_tiny_embedder

    weights = str(train_tiny_embedder(synth_lake, tmp_path / "tiny.pt", epochs=50))
    lake = sorted((synth_lake / "val" / "images").glob("*.jpg"))
    images, group, kind = calibration_set(lake, 50, PHOTOMETRIC + GEOMETRIC)
    vectors = embed(images, weights)
    t = dedup.DEFAULT_THRESHOLD
    i, j = np.triu_indices(len(group), 1)
    sims = np.einsum("nd,nd->n", vectors[i], vectors[j])
    report = {}
    for k in PHOTOMETRIC + GEOMETRIC:  # recall of each kind against its original
        pairs = (group[i] == group[j]) & (kind[i] == "original") & (kind[j] == k)
        report[k] = float((sims[pairs] >= t).mean())
    photometric = np.isin(kind, ("original",) + PHOTOMETRIC)
    recall, precision = pair_scores(sims[_pairs_within(photometric)] >= t, group[photometric])
    sys_recall, sys_precision = system_scores(tmp_path / "sys", vectors[photometric], group[photometric],
                                              kind[photometric], t)
    all_recall, all_precision = pair_scores(sims >= t, group)
    print(f"calibration at {t}: per kind {report}; jpeg/resize/brightness: pairs recall {recall:.3f} "
          f"precision {precision:.3f}, groups recall {sys_recall:.3f} precision {sys_precision:.3f}; "
          f"with crops and flips: pairs recall {all_recall:.3f} precision {all_precision:.3f}")
    assert recall >= 0.95 and precision >= 0.95
    assert sys_recall >= 0.95 and sys_precision >= 0.95
    assert min(report[k] for k in PHOTOMETRIC) >= 0.95


def _pairs_within(mask: np.ndarray) -> np.ndarray:
    """Of the upper-triangle pairs of all images, those with both ends in `mask`."""
    i, j = np.triu_indices(len(mask), 1)
    return mask[i] & mask[j]
