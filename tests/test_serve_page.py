"""The search page as people use it, and the /browse endpoint behind it: state in the URL
(open a URL, run a search, back/forward), filters alone listing the matching images a
page at a time, the region (semantic class) control, and the duplicates panel's 404 path.
Real uvicorn on loopback, real HTTP, Debian's headless Chromium (Selenium); the served
lake is tests.test_serve's (detections and semantic regions of known images)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import numpy as np
import pytest

from index.store import open_index
from pipelines.lake.sources import image_id
from pipelines.serve.engine import ServeConfig
from tests import test_serve
from tests.helpers import free_port
from tests.test_serve import CARS, PAIRS, N, Server, _semantic, chromium_driver

served = test_serve.served  # the same module-scoped lake, index and server, built for this module


def with_region(paths: list[Path], name: str, min_area: float, among=range(N)) -> set[str]:
    """Ids of the images whose `name` region covers at least min_area of the image."""
    return {image_id(str(paths[i])) for i in among
            if any(r["label_name"] == name and r["area"] / (64 * 48) >= min_area for r in _semantic(i))}


def ids(paths: list[Path], which) -> set[str]:
    return {image_id(str(paths[i])) for i in which}


def live_order(index_dir: Path) -> list[str]:
    return open_index(str(index_dir)).live_image_ids()


def in_order(order: list[str], wanted: set[str]) -> list[str]:
    return [i for i in order if i in wanted]


def test_browse_pages_the_filtered_images_in_row_order(served) -> None:
    client, paths, _, index_dir, _ = served
    order = live_order(index_dir)
    pages = [client.get("/browse", params={"offset": o, "limit": 500}).json() for o in (0, 500)]
    assert [p["total"] for p in pages] == [N, N] and [p["offset"] for p in pages] == [0, 500]
    everything = pages[0]["images"] + pages[1]["images"]
    assert [im["image_id"] for im in everything] == order and len(order) == N
    where = {im["image_id"]: im["uri"] for im in everything}
    assert where[image_id(str(paths[5]))] == str(paths[5])
    first = client.get("/browse").json()  # default page: 48 from the start
    assert first["offset"] == 0 and [im["image_id"] for im in first["images"]] == order[:48]
    got, offset = [], 0
    while True:  # pages of 7 over the car images: every one once, in row order
        body = client.get("/browse", params={"label": "car", "offset": offset, "limit": 7}).json()
        assert body["total"] == len(CARS) and len(body["images"]) <= 7
        if not body["images"]:
            break
        got += [im["image_id"] for im in body["images"]]
        offset += 7
    assert got == in_order(order, ids(paths, CARS))
    pairs = client.get("/browse", params={"label": "person", "min_count": 2}).json()
    assert pairs["total"] == len(PAIRS) and {im["image_id"] for im in pairs["images"]} == ids(paths, PAIRS)
    sky = client.get("/browse", params={"label": "car", "region": "sky", "min_area": 0.5}).json()
    want = with_region(paths, "sky", 0.5, CARS)
    assert 0 < sky["total"] == len(want) < len(CARS)
    assert [im["image_id"] for im in sky["images"]] == in_order(order, want)
    past = client.get("/browse", params={"offset": N, "limit": 10}).json()
    assert past == {"total": N, "offset": N, "images": []}
    none = client.get("/browse", params={"min_width": 65}).json()
    assert none["total"] == 0 and none["images"] == []


def test_labels_list_the_semantic_regions(served) -> None:
    client, paths, _, _, _ = served
    regions = client.get("/labels").json()["regions"]
    assert regions == {name: len(with_region(paths, name, 0.0)) for name in ("sky", "road")}
    assert regions["sky"] == N // 4


@pytest.mark.parametrize(("params", "status", "needle"), [
    ({"limit": 0}, 400, "limit must be in 1..500, got 0"),
    ({"limit": 501}, 400, "limit must be in 1..500, got 501"),
    ({"offset": -1}, 400, "offset must be >= 0, got -1"),
    ({"limit": "all"}, 422, "limit:"),
    ({"label": "unicorn"}, 400, "unknown label 'unicorn'"),
    ({"region": "lava"}, 400, "unknown region 'lava'"),
    ({"region": "sky", "min_area": 2}, 400, "min_area must be in [0, 1]"),
    ({"since": "yesterday"}, 400, "not an ISO date"),
])
def test_browse_refuses_bad_input_in_one_line(served, params, status, needle) -> None:
    client = served[0]
    r = client.get("/browse", params=params)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and needle in body["error"], body


def test_browse_needs_the_token_when_one_is_set(served) -> None:
    _, paths, _, index_dir, _ = served
    token = "browse-token-for-this-test-only"
    server = Server(ServeConfig(index=str(index_dir), port=free_port(), reload_s=0), token=token)
    try:
        r = httpx.get(f"{server.url}/browse", params={"label": "car"})
        assert r.status_code == 401 and "token" in r.json()["error"]
        assert httpx.get(f"{server.url}/browse", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = httpx.get(f"{server.url}/browse", params={"label": "car", "limit": 3},
                       headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and ok.json()["total"] == len(CARS) and len(ok.json()["images"]) == 3
        cookie = httpx.get(f"{server.url}/browse", cookies={"lakelens_token": token})
        assert cookie.status_code == 200 and cookie.json()["total"] == N
    finally:
        server.stop()


# -- the page, in Chromium ------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    driver = chromium_driver(tmp_path_factory.mktemp("chromium"))
    try:
        yield driver
    finally:
        driver.quit()


def waiter(browser):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # the grid is redrawn by each search: an element can go stale between two looks
    return WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,))


def shown(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    return [h.get_attribute("data-image-id") for h in browser.find_elements(By.CSS_SELECTOR, "#results .hit")]


def url_params(browser) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlparse(browser.current_url).query).items()}


def value(browser, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id).get_attribute("value")


def test_a_url_opens_its_search_and_each_search_updates_the_url(served, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _, paths, _, index_dir, server = served
    wait = waiter(browser)
    pairs = ids(paths, PAIRS)
    me = image_id(str(paths[PAIRS[1]]))
    browser.get(f"{server.url}/?" + urlencode({"image_id": me, "label": "person", "min_count": 2, "k": 4,
                                               "overlay": 1}))
    wait.until(lambda b: (h := shown(b)) and h[0] == me and len(h) == 4)
    assert set(shown(browser)) <= pairs
    assert (value(browser, "image-id"), value(browser, "label"), value(browser, "min-count"),
            value(browser, "k")) == (me, "person", "2", "4")
    assert browser.find_element(By.ID, "overlay").is_selected()
    thumbs = browser.find_elements(By.CSS_SELECTOR, "#results .hit img")
    assert thumbs and all("overlay=1" in t.get_attribute("src") for t in thumbs)
    assert "pass the filters" in browser.find_element(By.ID, "status").text
    # this branch's service has no duplicate data (404): the panel stays hidden, no error shown
    panel = browser.find_element(By.ID, "duplicates")
    wait.until(lambda b: panel.get_attribute("data-state") == "none"
               and panel.get_attribute("data-image-id") == me)
    assert not panel.is_displayed()
    assert "error" not in (browser.find_element(By.ID, "status").get_attribute("class") or "")
    browser.save_screenshot(str(tmp_path / "page-from-url.png"))

    other = shown(browser)[1]  # a search the user runs: click a neighbour
    browser.find_elements(By.CSS_SELECTOR, "#results .hit")[1].click()
    wait.until(lambda b: url_params(b).get("image_id") == other)
    assert url_params(browser) == {"image_id": other, "label": "person", "min_count": "2", "k": "4",
                                   "overlay": "1"}
    wait.until(lambda b: (h := shown(b)) and h[0] == other)
    # a changed control is a search too (typed over, as people do: clear() would be a search)
    browser.find_element(By.ID, "k").send_keys(Keys.CONTROL, "a", Keys.NULL, "3\n")
    wait.until(lambda b: url_params(b).get("k") == "3" and len(shown(b)) == 3)

    browser.back()  # back and forward run the searches of their URLs again
    wait.until(lambda b: url_params(b).get("k") == "4" and len(shown(b)) == 4 and shown(b)[0] == other)
    browser.back()
    wait.until(lambda b: value(b, "image-id") == me and (h := shown(b)) and h[0] == me)
    assert url_params(browser)["image_id"] == me and value(browser, "k") == "4"
    browser.forward()
    wait.until(lambda b: value(b, "image-id") == other and (h := shown(b)) and h[0] == other)

    # every filter the API takes opens from the URL: no image id, so the filters alone browse
    order = live_order(index_dir)
    query = {"label": "car", "region": "sky", "min_area": "0.5", "min_width": "10", "min_height": "20",
             "since": "2000-01-01", "until": "2100-01-01", "run_id": "night-1"}
    browser.get(f"{server.url}/?" + urlencode(query))
    want = in_order(order, with_region(paths, "sky", 0.5, CARS))
    wait.until(lambda b: shown(b) == want)
    assert [value(browser, c) for c in ("label", "region", "min-area", "min-width", "min-height", "since",
                                        "until", "run-id")] == list(query.values())
    assert browser.find_element(By.ID, "more").get_attribute("open") is not None
    assert f"of {len(want)}" in browser.find_element(By.ID, "status").text
    assert url_params(browser) == query


def test_filters_alone_browse_page_by_page_and_the_region_control_filters(served, browser,
                                                                           tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    _, paths, _, index_dir, server = served
    wait = waiter(browser)
    order = live_order(index_dir)
    cars = in_order(order, ids(paths, CARS))
    browser.get(f"{server.url}/?label=car")
    wait.until(lambda b: shown(b) == cars[:48])
    assert f"1–48 of {len(CARS)}" in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "pager").is_displayed()
    assert not browser.find_element(By.ID, "prev").is_enabled()
    browser.find_element(By.ID, "next").click()
    wait.until(lambda b: shown(b) == cars[48:96])
    assert url_params(browser) == {"label": "car", "offset": "48"}
    browser.find_element(By.ID, "next").click()
    wait.until(lambda b: shown(b) == cars[96:144] and url_params(b).get("offset") == "96")
    browser.back()
    wait.until(lambda b: shown(b) == cars[48:96] and url_params(b).get("offset") == "48")
    browser.save_screenshot(str(tmp_path / "page-browse.png"))

    # the region control: filled from the table's semantic classes, combined with min-area
    region = Select(browser.find_element(By.ID, "region"))
    assert {o.get_attribute("value") for o in region.options} == {"", "sky", "road"}
    Select(browser.find_element(By.ID, "label")).select_by_value("")
    wait.until(lambda b: shown(b) == order[:48] and url_params(b) == {})
    region.select_by_value("sky")
    sky = in_order(order, with_region(paths, "sky", 0.0))
    wait.until(lambda b: shown(b) == sky[:48] and url_params(b) == {"region": "sky"})
    browser.find_element(By.ID, "min-area").send_keys(Keys.CONTROL, "a", Keys.NULL, "0.5\n")
    big = in_order(order, with_region(paths, "sky", 0.5))
    assert 0 < len(big) < len(sky)
    wait.until(lambda b: shown(b) == big[:48] and url_params(b) == {"region": "sky", "min_area": "0.5"})
    assert f"of {len(big)}" in browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "next").click()
    wait.until(lambda b: shown(b) == big[48:])
    browser.save_screenshot(str(tmp_path / "page-region.png"))
    assert (tmp_path / "page-region.png").stat().st_size > 10_000

    # opening an image from the listing searches from it under the same filters
    target = big[50]
    browser.find_element(By.CSS_SELECTOR, f'#results .hit[data-image-id="{target}"]').click()
    wait.until(lambda b: (h := shown(b)) and h[0] == target and len(h) == 12 and set(h) <= set(big))
    assert url_params(browser) == {"image_id": target, "region": "sky", "min_area": "0.5"}
    assert not browser.find_element(By.ID, "pager").is_displayed()


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 20])
def test_true_rows_pages_across_blocks_like_flatnonzero(block: int) -> None:
    from pipelines.serve.engine import _true_rows

    keep = np.random.default_rng(5).random(200) < 0.3
    everything = np.flatnonzero(keep)
    n = len(everything)
    for offset, limit in [(0, 1), (0, 500), (3, 10), (17, 40), (n - 2, 10), (n, 5), (1000, 3)]:
        got = _true_rows(keep, offset, limit, block=block)
        assert got.dtype == np.int64 and got.tolist() == everything[offset:offset + limit].tolist()
