"""`lakelens serve`: real uvicorn on a free loopback port, real HTTP (httpx), a real index and
Delta table made from synthetic images embedded by the real `tiny` embedder, and the web
page in Debian's headless Chromium (Selenium)."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models.predict import EmbeddingPredictor
from pipelines.indexing import IndexBuildConfig, build
from pipelines.lake.sources import image_id
from pipelines.lake.table import open_table, save_meta
from pipelines.serve.engine import ServeConfig
from tests.helpers import commit_rows, free_port

N = 600
PAIRS = [i for i in range(N) if i % 100 == 7]  # 6 images (1%) with two people
ONE_PERSON = [i for i in range(N) if i % 10 == 3]
CARS = [i for i in range(N) if i % 3 == 0]
FACTORY = "IVF16,Flat"  # lists hold ~37 images: one probed list rarely holds a 1% filter's k hits


def _detections(i: int) -> list[dict]:
    dets = []
    people = 2 if i in PAIRS else 1 if i in ONE_PERSON else 0
    for n in range(people):
        dets.append({"box": [4.0 + n, 4.0, 30.0, 40.0], "label": 1, "label_name": "person",
                     "score": 0.9})
    if i in CARS:
        dets.append({"box": [10.0, 10.0, 50.0, 30.0], "label": 3, "label_name": "car", "score": 0.8})
    if i % 50 == 1:  # a doubtful person: counts only at a low min_score
        dets.append({"box": [1.0, 1.0, 9.0, 9.0], "label": 1, "label_name": "person", "score": 0.2})
    return dets


def _semantic(i: int) -> list[dict]:
    """Semantic regions as the semantic task writes them (real RLE masks, pixel areas): sky
    over the top 3..36 rows (1/16..3/4) of every 4th image, road over the bottom quarter of
    every 5th."""
    from pycocotools import mask as mask_utils

    regions = []
    for name, label, on, band in (("sky", 1, i % 4 == 0, slice(0, 3 * (1 + (i // 4) % 12))),
                                  ("road", 2, i % 5 == 2, slice(36, 48))):
        if on:
            pixels = np.zeros((48, 64), np.uint8, order="F")
            pixels[band] = 1
            rle = mask_utils.encode(pixels)
            regions.append({"label": label, "label_name": name, "area": int(pixels.sum()),
                            "mean_score": 0.8,
                            "mask": {"size": [48, 64], "counts": rle["counts"].decode("ascii")}})
    return regions


def write_lake(root: Path) -> tuple[list[Path], Path]:
    """N small distinct JPEGs, their tiny-embedder vectors and known detections committed
    as one chunk of a real table; returns the image paths and the table's DIR."""
    rng = np.random.default_rng(3)
    (root / "lake").mkdir(parents=True)
    paths = []
    for i in range(N):
        pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # blocky, one of a kind
        img = Image.fromarray(pixels).resize((64, 48), Image.Resampling.NEAREST)
        paths.append(root / "lake" / f"{i:04d}.jpg")
        img.save(paths[-1], quality=95)
    predictor = EmbeddingPredictor("tiny", weights="random")
    vectors = predictor([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    models = [{"task": "detect", "arch": "fasterrcnn_tiny", "weights": "random:seed0"},
              {"task": "semantic", "arch": "unet_tiny", "weights": "random:seed0"},
              {"task": "embed", "arch": "tiny", "weights": predictor.info.weights_id}]
    rows = [{"image_id": image_id(str(p)), "uri": str(p), "content_hash": f"h{i}", "width": 64,
             "height": 48, "embedding": vectors[i].tolist(), "detections": _detections(i),
             "semantic": _semantic(i), "models": models} for i, p in enumerate(paths)]
    out = commit_rows(root / "out", rows, run_id="night-1")
    table = open_table(str(out))
    dim = len(vectors[0])
    table.meta["embedding_dim"] = dim
    table.meta["models"] = {"embed": {"arch": "tiny", "weights_id": predictor.info.weights_id,
                                      "spec": "random", "labels": [], "keypoint_names": [],
                                      "embedding_dim": dim},
                            "semantic": {"arch": "unet_tiny", "weights_id": "random:seed0",
                                         "labels": ["__background__", "sky", "road"]}}
    save_meta(table)
    return paths, out


class Server:
    """The app under a real uvicorn in a thread of this process, on 127.0.0.1."""

    def __init__(self, cfg: ServeConfig, token: str | None = None):
        import uvicorn

        from pipelines.serve.app import create_app

        self.app = create_app(cfg, token=token)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=cfg.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{cfg.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve")
    paths, out = write_lake(root)
    build(IndexBuildConfig(results=str(out), out=str(root / "index"), factory=FACTORY))
    server = Server(ServeConfig(index=str(root / "index"), port=free_port(), reload_s=0.2, max_k=50))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, paths, out, root / "index", server
    server.stop()


def ids_of(body: dict) -> list[str]:
    return [h["image_id"] for h in body["results"][0]]


def test_health_stats_labels(served) -> None:
    client, paths, _, _, _ = served
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["images"] == N
    stats = client.get("/stats").json()
    assert stats["factory"] == FACTORY and stats["images"] == N and stats["filters"] is True
    assert stats["memory_mapped"] is True and 0 < stats["recall_at_10"] <= 1
    assert stats["table_version"] == 1 and stats["embedder"]["arch"] == "tiny"
    labels = client.get("/labels").json()
    assert labels["source"] == "detections"
    assert labels["labels"] == {"person": len(PAIRS) + len(ONE_PERSON), "car": len(CARS)}
    assert "/search/vector" in client.get("/openapi.json").json()["paths"]


def test_search_by_id_vector_and_upload_find_the_image_itself(served) -> None:
    client, paths, _, _, _ = served
    me = image_id(str(paths[42]))
    body = client.get("/search", params={"image_id": me, "k": 5}).json()
    assert ids_of(body)[0] == me and len(body["results"][0]) == 5
    first = body["results"][0][0]
    assert first["rank"] == 1 and first["uri"] == str(paths[42]) and first["width"] == 64
    assert first["score"] == pytest.approx(1.0, abs=1e-3)  # cosine of itself
    scores = [h["score"] for h in body["results"][0]]
    assert scores == sorted(scores, reverse=True)
    pixels = np.asarray(Image.open(paths[9]).convert("RGB"))
    vector = EmbeddingPredictor("tiny", weights="random")([pixels])[0]
    body = client.post("/search/vector", json={"vectors": [vector.tolist()] * 2, "k": 3}).json()
    assert [r[0]["image_id"] for r in body["results"]] == [image_id(str(paths[9]))] * 2
    files = [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in (paths[5], paths[77])]
    body = client.post("/search/image", params={"k": 4}, files=files).json()
    assert [r[0]["image_id"] for r in body["results"]] == [image_id(str(paths[5])), image_id(str(paths[77]))]
    assert body["queries"] == ["0005.jpg", "0077.jpg"]


def test_a_one_percent_filter_still_returns_k_hits(served) -> None:
    client, paths, _, _, _ = served
    pairs = {image_id(str(paths[i])) for i in PAIRS}
    for query in (3, 250, 599):
        body = client.get("/search", params={"image_id": image_id(str(paths[query])), "k": 5,
                                             "label": "person", "min_count": 2, "nprobe": 1}).json()
        assert body["allowed"] == len(PAIRS)
        assert len(ids_of(body)) == 5 and set(ids_of(body)) <= pairs, body
    unfiltered = client.get("/search", params={"image_id": image_id(str(paths[3])), "k": 5,
                                               "nprobe": 1}).json()
    assert not set(ids_of(unfiltered)) <= pairs  # the filter is what changed the answer
    cars = client.get("/search", params={"image_id": image_id(str(paths[1])), "k": 50,
                                         "label": "car"}).json()
    assert set(ids_of(cars)) <= {image_id(str(paths[i])) for i in CARS} and len(ids_of(cars)) == 50
    low = client.get("/search", params={"image_id": image_id(str(paths[1])), "k": 50,
                                        "label": "person", "min_score": 0.1}).json()
    high = client.get("/search", params={"image_id": image_id(str(paths[1])), "k": 50,
                                         "label": "person", "min_score": 0.5}).json()
    assert low["allowed"] > high["allowed"] == len(PAIRS) + len(ONE_PERSON)
    sized = client.post("/search/vector", json={"vector": [0.1] * 128, "k": 5, "min_width": 65}).json()
    assert sized["allowed"] == 0 and sized["results"] == [[]]
    dated = client.get("/search", params={"image_id": image_id(str(paths[1])), "k": 3,
                                          "since": "2000-01-01", "run_id": "night-1"}).json()
    assert dated["allowed"] == N and len(ids_of(dated)) == 3
    future = client.get("/search", params={"image_id": image_id(str(paths[1])), "k": 3,
                                           "since": datetime.now(UTC).replace(year=2100).isoformat()}).json()
    assert future["allowed"] == 0


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "needle"), [
    ("get", "/search", {"params": {"image_id": "0" * 32}}, 404, "not in the index"),
    ("get", "/search", {"params": {"image_id": "../../etc/passwd"}}, 404, "not in the index"),
    ("get", "/search", {"params": {"image_id": "ID", "k": 0}}, 400, "k must be in 1..50"),
    ("get", "/search", {"params": {"image_id": "ID", "k": 51}}, 400, "k must be in 1..50"),
    ("get", "/search", {"params": {"image_id": "ID", "k": "ten"}}, 422, "k:"),
    ("get", "/search", {"params": {"image_id": "ID", "label": "unicorn"}}, 400, "unknown label 'unicorn'"),
    ("get", "/search", {"params": {"image_id": "ID", "run_id": "night-9"}}, 400, "unknown run_id"),
    ("get", "/search", {"params": {"image_id": "ID", "since": "yesterday"}}, 400, "not an ISO date"),
    ("get", "/search", {"params": {"image_id": "ID", "min_score": 2}}, 400, "min_score must be in"),
    ("get", "/search", {"params": {"image_id": "ID", "nprobe": 0}}, 400, "nprobe must be >= 1"),
    ("post", "/search/vector", {"json": {"vector": [1.0, 2.0]}}, 400, "dim 2; the index holds dim 128"),
    ("post", "/search/vector", {"json": {"vector": [1.0] * 128, "vectors": [[1.0] * 128]}}, 400,
     "exactly one of"),
    ("post", "/search/vector", {"json": {"vectors": [[1.0] * 128, [1.0]]}}, 400, "equally long"),
    ("post", "/search/vector", {"json": {"vector": ["x"] * 128}}, 422, "vector"),
    ("post", "/search/vector", {"content": b"{not json", "headers": {"content-type": "application/json"}},
     422, "Invalid JSON"),
    ("post", "/search/image", {"files": [("image", ("a.txt", b"hello, not an image", "text/plain"))]},
     400, "upload 1 is not a readable image"),
    ("post", "/search/image", {"files": [("image", ("e.jpg", b"", "image/jpeg"))]}, 400, "is empty"),
    ("post", "/search/image", {}, 422, "image"),
    ("get", "/images/" + "0" * 32, {}, 404, "not in the index"),
    ("get", "/images/ID", {"params": {"size": 5000}}, 400, "size must be in"),
])
def test_bad_input_is_a_4xx_with_one_line(served, method, path, kwargs, status, needle) -> None:
    client, paths, _, _, _ = served
    real = image_id(str(paths[0]))
    if "params" in kwargs:
        kwargs = {**kwargs, "params": {k: (real if v == "ID" else v) for k, v in kwargs["params"].items()}}
    r = getattr(client, method)(path.replace("/ID", "/" + real), **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"]
    assert needle in body["error"], body


def test_limits_on_pixels_and_body(served, tmp_path: Path) -> None:
    client, _, _, root_index, _ = served
    huge = io.BytesIO()
    Image.new("L", (10_000, 6_000)).save(huge, format="PNG")  # 60 MP, compresses to ~60 KB
    r = client.post("/search/image", files=[("image", ("big.png", huge.getvalue(), "image/png"))])
    assert r.status_code == 400 and "exceeds the limit" in r.json()["error"]
    cfg = ServeConfig(index=str(root_index), port=free_port(), reload_s=0, max_body_mb=0.01)
    small = Server(cfg)
    try:
        r = httpx.post(f"{small.url}/search/image", files=[("image", ("b.jpg", b"x" * 20_000, "image/jpeg"))])
        assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    finally:
        small.stop()


def test_images_are_served_resized_with_overlays(served, tmp_path: Path) -> None:
    client, paths, _, _, _ = served
    pid = image_id(str(paths[PAIRS[0]]))
    plain = client.get(f"/images/{pid}", params={"size": 128})
    assert plain.status_code == 200 and plain.headers["content-type"] == "image/jpeg"
    a = np.asarray(Image.open(io.BytesIO(plain.content)).convert("RGB"), np.int16)
    assert a.shape == (48, 64, 3)  # shrunk to a longer side of `size`, never enlarged
    drawn = client.get(f"/images/{pid}", params={"size": 128, "overlay": 1})
    b = np.asarray(Image.open(io.BytesIO(drawn.content)).convert("RGB"), np.int16)
    assert b.shape == a.shape and np.abs(a - b).max() > 100  # boxes were drawn on it
    Image.fromarray(b.astype(np.uint8)).save(tmp_path / "overlay.png")


def test_token_is_required_when_set(served) -> None:
    _, paths, _, root_index, _ = served
    token = "s3cret-token-for-this-test-only"
    server = Server(ServeConfig(index=str(root_index), port=free_port(), reload_s=0), token=token)
    try:
        me = image_id(str(paths[0]))
        assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no secret
        assert httpx.get(f"{server.url}/").status_code == 200  # the page asks for the token
        r = httpx.get(f"{server.url}/search", params={"image_id": me})
        assert r.status_code == 401 and "token" in r.json()["error"]
        wrong = httpx.get(f"{server.url}/search", params={"image_id": me},
                          headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = httpx.get(f"{server.url}/search", params={"image_id": me},
                       headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and ids_of(ok.json())[0] == me
        cookie = httpx.get(f"{server.url}/images/{me}", cookies={"lakelens_token": token})
        assert cookie.status_code == 200
    finally:
        server.stop()


def test_reload_under_load_fails_no_request(served) -> None:
    """Queries run from four threads while two new index versions are switched in: every
    request succeeds and the service ends on the newest version, without a restart."""
    client, paths, out, index_dir, server = served
    before = client.get("/health").json()["index_version"]
    stop, errors, served_by = threading.Event(), [], Counter()

    def hammer(n: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            i = n
            while not stop.is_set():
                r = c.get("/search", params={"image_id": image_id(str(paths[i % N])), "k": 5,
                                             "label": "car"})
                if r.status_code != 200 or len(ids_of(r.json())) != 5:
                    errors.append((r.status_code, r.text[:200]))
                else:
                    served_by[r.json()["index_version"]] += 1
                i += 7

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(2):
            time.sleep(0.5)
            newest = build(IndexBuildConfig(results=str(out), out=str(index_dir), factory=FACTORY))["version"]
        deadline = time.time() + 30  # until the newest version serves (a reload may skip one)
        while client.get("/health").json()["index_version"] != newest and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:3]
    now = client.get("/health").json()["index_version"]
    assert now != before and served_by[now] > 0 and sum(served_by.values()) > 20, served_by
    assert client.get("/stats").json()["reloads"] >= 1


def test_concurrent_queries_are_batched_and_each_gets_its_own_answer(served) -> None:
    client, paths, _, _, server = served
    before = client.get("/stats").json()
    wrong: list = []

    def ask(n: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for j in range(15):
                i = (n * 37 + j * 11) % N
                me = image_id(str(paths[i]))
                hits = ids_of(c.get("/search", params={"image_id": me, "k": 3}).json())
                if hits[0] != me:
                    wrong.append((me, hits))

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = client.get("/stats").json()
    assert not wrong, wrong[:3]
    queries = after["searched_queries"] - before["searched_queries"]
    calls = after["search_calls"] - before["search_calls"]
    assert queries == 12 * 15 and calls < queries, (calls, queries)


def test_warns_when_open_beyond_loopback(capsys) -> None:
    from pipelines.serve import is_loopback, warn_if_open

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    warn_if_open("127.0.0.1", None)
    warn_if_open("0.0.0.0", "a-token-set-by-the-user")
    assert capsys.readouterr().err == ""
    warn_if_open("0.0.0.0", None)
    assert "NO authentication" in capsys.readouterr().err


def test_cli_serves_and_refuses_bad_input(served, tmp_path: Path) -> None:
    from tests.test_cli import _one_line_error, lakelens

    _, paths, _, index_dir, _ = served
    _one_line_error(lakelens("serve", str(tmp_path / "nope")), "does not exist")
    _one_line_error(lakelens("serve", str(index_dir), "--workers", "0"), "--workers must be >= 1")
    (tmp_path / "short").write_text("abc\n")
    _one_line_error(lakelens("serve", str(index_dir), "--token-file", str(tmp_path / "short")),
                    "at least 16")
    token = tmp_path / "token"
    token.write_text("a-token-of-twenty-chars\n")
    port = free_port()
    # two uvicorn worker processes: each builds the app from the environment, token included
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", str(index_dir), "--port",
                             str(port), "--token-file", str(token), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, r = time.time() + 90, None
        while time.time() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/search",
                              params={"image_id": image_id(str(paths[1]))},
                              headers={"Authorization": "Bearer a-token-of-twenty-chars"})
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert r is not None and r.status_code == 200, proc.stderr.read() if proc.poll() is not None else r
        assert ids_of(r.json())[0] == image_id(str(paths[1]))
        assert httpx.get(f"http://127.0.0.1:{port}/stats").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def chromium_driver(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.fail("chromium and chromedriver are missing: `make browser` installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_web_page_in_a_real_browser(served, tmp_path: Path) -> None:
    """Load the page, upload an image, see k results; filter to two people, see the grid
    change to those images; click a neighbour to search from it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    client, paths, _, _, server = served
    browser = chromium_driver(tmp_path)
    try:
        browser.get(server.url + "/")
        # the grid is redrawn by each search a filter change starts: an element can go stale
        wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#label option")) == 3)
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("8")
        browser.find_element(By.ID, "file").send_keys(str(paths[42]))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .hit")) == 8)
        hits = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
        first = [h.get_attribute("data-image-id") for h in hits]
        assert first[0] == image_id(str(paths[42]))
        assert browser.find_element(By.ID, "query-image").get_attribute("src").startswith("blob:")
        assert all(float(h.find_element(By.CSS_SELECTOR, ".score").text) <= 1.001 for h in hits)
        browser.save_screenshot(str(tmp_path / "page-upload.png"))
        min_count = browser.find_element(By.ID, "min-count")
        min_count.clear()
        min_count.send_keys("2")
        Select(browser.find_element(By.ID, "label")).select_by_value("person")
        pairs = {image_id(str(paths[i])) for i in PAIRS}

        def filtered(b) -> list[str] | None:
            hits = b.find_elements(By.CSS_SELECTOR, "#results .hit")
            ids = [h.get_attribute("data-image-id") for h in hits]
            return ids if ids and set(ids) <= pairs and len(ids) == len(PAIRS) else None

        shown = wait.until(filtered)
        assert set(shown) == pairs
        assert "pass the filters" in browser.find_element(By.ID, "status").text
        browser.save_screenshot(str(tmp_path / "page-filtered.png"))
        browser.find_elements(By.CSS_SELECTOR, "#results .hit")[2].click()
        wait.until(lambda b: b.find_element(By.ID, "image-id").get_attribute("value") == shown[2])
        wait.until(lambda b: (h := b.find_elements(By.CSS_SELECTOR, "#results .hit"))
                   and h[0].get_attribute("data-image-id") == shown[2])
        assert (tmp_path / "page-filtered.png").stat().st_size > 10_000
    finally:
        browser.quit()


@pytest.mark.slow
def test_ray_serve_deployment_answers_like_the_single_process(served, tmp_path: Path) -> None:
    """`lakelens serve --ray` on a local Ray: Serve's proxy on loopback, one replica that
    holds the index; the same answers and errors as under uvicorn; Ctrl-C stops it."""
    import os
    import signal

    client, paths, _, index_dir, _ = served
    port = free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", str(index_dir), "--ray",
                             "--port", str(port), "--max-replicas", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    me = image_id(str(paths[11]))
    try:
        deadline, r = time.time() + 180, None
        while time.time() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/search", params={"image_id": me, "k": 4},
                              timeout=30)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert r is not None and r.status_code == 200, proc.stderr.read() if proc.poll() is not None else r
        local = client.get("/search", params={"image_id": me, "k": 4}).json()
        assert ids_of(r.json()) == ids_of(local)
        bad = httpx.get(f"http://127.0.0.1:{port}/search", params={"image_id": me, "label": "unicorn"})
        assert bad.status_code == 400 and "unknown label" in bad.json()["error"]
        labels = httpx.get(f"http://127.0.0.1:{port}/labels").json()
        assert labels["labels"]["car"] == len(CARS)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130), proc.stderr.read()[-3000:]


def test_filters_of_a_segment_only_table_count_its_instances(tmp_path: Path) -> None:
    """A table annotated with a segment model alone keeps `detections` null: the filters
    count the instances' labels instead."""
    from pipelines.serve.engine import Engine
    from pipelines.serve.facets import Filter

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((40, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    mask = {"size": [48, 64], "counts": "0"}  # the RLE is not read by the filters
    rows = [{"image_id": f"img{i:03d}", "uri": f"/lake/{i}.jpg", "width": 64, "height": 48,
             "embedding": vectors[i].tolist(),
             "instances": [{"box": [1.0, 1.0, 9.0, 9.0], "label": 1, "label_name": "person",
                            "score": 0.9, "mask": mask}] * (2 if i < 4 else 0)}
            for i in range(40)]
    out = commit_rows(tmp_path / "out", rows)
    table = open_table(str(out))
    table.meta["embedding_dim"] = 8
    table.meta["models"] = {
        "segment": {"arch": "maskrcnn_tiny", "weights_id": "random:seed0"},
        "embed": {"arch": "tiny", "weights_id": "random:seed0", "spec": "random", "labels": [],
                  "keypoint_names": [], "embedding_dim": 8}}
    save_meta(table)
    build(IndexBuildConfig(results=str(out), out=str(tmp_path / "index")))
    snap = Engine(ServeConfig(index=str(tmp_path / "index"), reload_s=0)).current()
    assert snap.facets.source == "instances"
    found, allowed = snap.search(vectors[10], 3, Filter(label="person", min_count=2), None)
    assert allowed == 4 and set(found.image_ids[0]) <= {f"img{i:03d}" for i in range(4)}


# -- facets at scale: posting lists against the table, incremental reloads, lookups --------

SCALE_N = 20_000
SCALE_LABELS = ["person", "car", "dog", "cat", "bike"]
REGIONS = ["sky", "road", "grass"]
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _sid(i: int) -> str:
    """A 32-hex-digit image id, spread like lakelens's (sha256) ones."""
    import hashlib

    return hashlib.md5(str(i).encode()).hexdigest()


def _scale_row(i: int, rng: np.random.Generator, run: str, status: str = "ok") -> dict:
    """One image's row: 0..5 detections of common labels, `rare` on 1% (twice on 1/3 of
    those), 0..3 semantic regions, one of four sizes, a time of its own."""
    from datetime import timedelta

    row = {"image_id": _sid(i), "uri": f"/lake/{i}.jpg", "content_hash": f"h{i}-{run}",
           "status": status, "run_id": run, "annotated_at": T0 + timedelta(minutes=i)}
    if status != "ok":
        return row
    width, height = [(64, 48), (128, 96), (640, 480), (48, 200)][int(rng.integers(4))]
    names = rng.choice(SCALE_LABELS, int(rng.integers(0, 6)))
    dets = [{"box": [1.0, 1.0, 20.0, 20.0], "label": 1, "label_name": str(name),
             "score": float(round(rng.random(), 2))} for name in names]
    if i % 100 == 7:
        dets += [{"box": [2.0, 2.0, 30.0, 30.0], "label": 9, "label_name": "rare", "score": 0.9}] * (
            2 if i % 300 == 7 else 1)
    regions = [{"label": n, "label_name": name, "mask": {"size": [height, width], "counts": "0"},
                "area": int(rng.integers(0, width * height + 1)), "mean_score": 0.8}
               for n, name in enumerate(REGIONS) if rng.random() < 0.4]
    vector = rng.standard_normal(8)
    models = [{"task": t, "arch": "tiny", "weights": "random:seed0"} for t in ("detect", "semantic", "embed")]
    return {**row, "width": width, "height": height, "detections": dets, "semantic": regions,
            "embedding": (vector / np.linalg.norm(vector)).tolist(), "models": models}


SCALE_FILTERS = [
    dict(label="person"), dict(label="car", min_count=2), dict(label="dog", min_score=0.3, min_count=3),
    dict(label="rare"), dict(label="rare", min_count=2), dict(label="cat", min_score=0.95),
    dict(region="sky"), dict(region="road", min_area=0.3), dict(min_width=100),
    dict(min_width=50, min_height=100), dict(since=T0.replace(day=5), until=T0.replace(day=9)),
    dict(run_id="night-1"), dict(run_id="night-2"),
    dict(label="person", region="sky", min_width=100, since=T0.replace(day=3)),
    dict(label="car", min_count=2, run_id="night-1", until=T0.replace(day=10)),
    dict(region="grass", min_area=0.5, label="rare"),
]


def _expected(table, ids, f) -> np.ndarray:
    """The index rows passing `f`, computed by pyarrow over the table's current view as one
    table (not the facets' streamed path)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cur = table.current_table(["image_id", "width", "height", "annotated_at", "run_id", "detections",
                               "semantic"])
    keep = np.ones(cur.num_rows, bool)
    if f.label is not None:
        dets = pc.list_flatten(cur.column("detections"))
        parent = pc.list_parent_indices(cur.column("detections")).to_numpy()
        hit = pc.and_(pc.equal(pc.struct_field(dets, "label_name"), f.label),
                      pc.greater_equal(pc.struct_field(dets, "score"), pa.scalar(f.min_score, pa.float32())))
        keep &= np.bincount(parent[hit.to_numpy(zero_copy_only=False)], minlength=cur.num_rows) >= f.min_count
    if f.region is not None:
        sem = pc.list_flatten(cur.column("semantic"))
        parent = pc.list_parent_indices(cur.column("semantic")).to_numpy()
        pixels = np.maximum(cur.column("width").to_numpy().astype(np.float64)
                            * cur.column("height").to_numpy(), 1.0)[parent]
        frac = (pc.struct_field(sem, "area").to_numpy() / pixels).astype(np.float32)
        named = pc.equal(pc.struct_field(sem, "label_name"), f.region).to_numpy(zero_copy_only=False)
        hit = named & (frac >= f.min_area)
        keep &= np.bincount(parent[hit], minlength=cur.num_rows) > 0
    if f.min_width is not None:
        keep &= cur.column("width").to_numpy() >= f.min_width
    if f.min_height is not None:
        keep &= cur.column("height").to_numpy() >= f.min_height
    at = cur.column("annotated_at")
    if f.since is not None:
        keep &= pc.greater_equal(at, pa.scalar(f.since, at.type)).to_numpy(zero_copy_only=False)
    if f.until is not None:
        keep &= pc.less(at, pa.scalar(f.until, at.type)).to_numpy(zero_copy_only=False)
    if f.run_id is not None:
        keep &= pc.equal(cur.column("run_id"), f.run_id).to_numpy(zero_copy_only=False)
    rows = ids.rows_of(cur.column("image_id"))
    return np.sort(rows[keep & (rows >= 0)])


@pytest.fixture(scope="module")
def scale_lake(tmp_path_factory: pytest.TempPathFactory):
    """20,000 images (1% of them errors) in one chunk, the snapshot built by upkeep, a Flat
    index, and an engine serving it (no watcher: reloads are called by the tests)."""
    from pipelines.lake.upkeep import run_upkeep
    from pipelines.serve.engine import Engine

    root = tmp_path_factory.mktemp("scale")
    rng = np.random.default_rng(5)
    rows = [_scale_row(i, rng, "night-1", "error" if i % 97 == 5 else "ok") for i in range(SCALE_N)]
    out = commit_rows(root / "out", rows, run_id="night-1")
    table = open_table(str(out))
    table.meta["embedding_dim"] = 8
    spec = {"arch": "tiny", "weights_id": "random:seed0", "spec": "random", "labels": [],
            "keypoint_names": []}
    table.meta["models"] = {"detect": spec, "semantic": spec, "embed": {**spec, "embedding_dim": 8}}
    save_meta(table)
    run_upkeep(open_table(str(out)))
    build(IndexBuildConfig(results=str(out), out=str(root / "index"), factory="Flat"))
    engine = Engine(ServeConfig(index=str(root / "index"), reload_s=0))
    return out, root / "index", engine


def test_facet_filters_return_exactly_the_rows_the_table_says(scale_lake) -> None:
    from models.errors import LakelensError
    from pipelines.serve.facets import Filter

    out, _, engine = scale_lake
    snap = engine.current()
    table = open_table(str(out))
    assert snap.facets.table_version == table.version and not snap.facets.incremental
    for spec in SCALE_FILTERS:
        f = Filter(**spec)
        if spec.get("run_id") == "night-2":  # not written yet: a one-line error names it
            with pytest.raises(LakelensError, match="unknown run_id 'night-2'"):
                snap.facets.select(f)
            continue
        got = snap.facets.select(f)
        want = _expected(table, snap.index.ids, f)
        assert got.dtype == np.int64 and np.array_equal(got, want), (spec, len(got), len(want))
        assert np.array_equal(np.flatnonzero(snap.facets.mask(f)), want)
    assert len(snap.facets.select(Filter(label="rare"))) == SCALE_N // 100 - 2  # two of them are errors
    assert snap.facets.select(Filter()) is None
    found, allowed = snap.search(snap.index.vectors_of([_sid(999)]), 10, Filter(label="rare"), None)
    rare = set(_expected(table, snap.index.ids, Filter(label="rare")).tolist())
    assert allowed == len(rare) and len(found.rows[0]) == 10 and set(found.rows[0].tolist()) <= rare


@pytest.fixture(scope="module")
def second_night(scale_lake):
    """A second night committed to the table (no index update yet): 500 new images, 300
    changed (some of them errors before), 50 tombstones, 30 images now errors."""
    out, _, _ = scale_lake
    rng = np.random.default_rng(6)
    changed = list(range(0, 3000, 10))
    gone, broken = list(range(1, 500, 10)), list(range(2, 300, 10))
    rows = ([_scale_row(i, rng, "night-2") for i in [*range(SCALE_N, SCALE_N + 500), *changed]]
            + [{**_scale_row(i, rng, "night-2", "tombstone"), "reason": "vanished"} for i in gone]
            + [_scale_row(i, rng, "night-2", "error") for i in broken])
    commit_rows(out, rows, run_id="night-2")
    return {"changed": changed, "gone": gone, "broken": broken}


def test_lookup_finds_snapshot_and_log_rows_without_a_part_scan(scale_lake, second_night) -> None:
    out, _, _ = scale_lake
    table = open_table(str(out))
    cols = ["image_id", "width", "height", "detections", "semantic", "run_id", "status"]
    current = {r["image_id"]: r for r in table.current_table(cols, status=None).to_pylist()}
    some = {"snapshot": 3, "changed": second_night["changed"][5], "new": SCALE_N + 7,
            "gone": second_night["gone"][3], "broken": second_night["broken"][2], "error-before": 5 + 97 * 3}
    for what, i in some.items():
        iid = _sid(i)
        part = [p for p in table.parts() if iid.startswith(p)][0]
        assert table.watermark(part) >= 1  # the first night is in the snapshot
        row = table.lookup(iid, cols[1:])
        want = current.get(iid)
        if want is None or want["status"] != "ok":
            assert row is None, what
        else:
            assert row == {c: want[c] for c in cols[1:]}, what
            assert row["run_id"] == ("night-1" if what == "snapshot" else "night-2"), what
        anything = table.lookup(iid, cols[1:], status=None)
        assert (anything is None) == (want is None), what
        if want is not None:
            assert anything["status"] == want["status"], what
    assert table.lookup("f" * 32, ["width"]) is None and table.lookup("not-hex", ["width"]) is None


def test_reload_on_current_change_only_with_incremental_facets(scale_lake, second_night) -> None:
    import pyarrow as pa

    from pipelines.indexing import update
    from pipelines.serve.facets import Facets, Filter

    out, index_dir, engine = scale_lake
    before = engine.current()
    assert not engine.reload_if_changed()  # a table commit alone: nothing reloads
    assert engine.current() is before
    m = update(str(index_dir), str(out))
    assert m["last_update"]["from_table_version"] == before.facets.table_version and "rebuilt" not in m[
        "last_update"]
    assert engine.reload_if_changed() and not engine.reload_if_changed()
    snap = engine.current()
    assert snap.version == m["version"] != before.version and snap.facets.incremental
    table = open_table(str(out))
    fresh = Facets(table, snap.index.ids)
    inc = snap.facets
    assert inc.table_version == fresh.table_version == table.version and inc.rows == fresh.rows
    for name in ("present", "width", "height", "at_us"):
        assert np.array_equal(getattr(inc, name), getattr(fresh, name)), name
    run_names = lambda f: np.array([None, *sorted(f.runs, key=f.runs.get)], dtype=object)[f.run + 1]  # noqa: E731
    assert np.array_equal(run_names(inc), run_names(fresh))
    assert set(inc.labels) == set(fresh.labels) and set(inc.regions) == set(fresh.regions)
    pairs = ((inc.det, inc.labels, fresh.det, fresh.labels), (inc.seg, inc.regions, fresh.seg, fresh.regions))
    for postings, names, fresh_postings, fresh_names in pairs:
        for name in names:
            a, b = postings.of(names[name]), fresh_postings.of(fresh_names[name])
            sa, sb = np.lexsort((a[1], a[0])), np.lexsort((b[1], b[0]))
            assert np.array_equal(a[0][sa], b[0][sb]) and np.array_equal(a[1][sa], b[1][sb]), name
    assert inc.label_counts(0.3) == fresh.label_counts(0.3) and inc.region_counts() == fresh.region_counts()
    for spec in SCALE_FILTERS:
        f = Filter(**spec)
        assert np.array_equal(inc.select(f), _expected(table, snap.index.ids, f)), spec
    # the replaced, vanished and broken images' old rows no longer pass any filter
    old_rows = before.index.ids.rows_of(pa.array([_sid(i) for i in second_night["gone"]
                                                  + second_night["broken"]]))
    old_rows = old_rows[old_rows >= 0]  # those that were errors on the first night have none
    assert len(old_rows) > 70 and not inc.present[old_rows].any()
    assert len(inc.select(Filter(run_id="night-2"))) == 500 + len(second_night["changed"])
    # the old snapshot still answers as it did (requests in flight finish on it)
    assert before.facets.present[old_rows].all()
