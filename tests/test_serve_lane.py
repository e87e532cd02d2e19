"""`POST /search/vector`'s fast lane (pipelines.serve.app.LakelensAPI): the same answers
and errors as its FastAPI route, behind the same token and body limits, batched into
shared FAISS calls; the search thread's OpenMP setup. Real uvicorn servers on loopback
over a real lake table and a real FAISS index."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from pipelines.indexing import IndexBuildConfig, build
from pipelines.serve.engine import ServeConfig, search_threads
from tests.helpers import clustered_vectors, free_port, write_results
from tests.test_serve import Server

N, DIM = 400, 32
TOKEN = "lane-token-for-this-test-only"
LIMIT_MB = 0.05  # 52,428 bytes: a 1-vector body fits, 200 vectors do not


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lane")
    vectors = clustered_vectors(N, DIM, seed=3)
    write_results(root / "results", vectors)
    build(IndexBuildConfig(results=str(root / "results"), out=str(root / "index"), factory="Flat"))
    lane = Server(ServeConfig(index=str(root / "index"), port=free_port(), reload_s=0, max_k=40))
    route = Server(ServeConfig(index=str(root / "index"), port=free_port(), reload_s=0, max_k=40))
    route.app.lanes = {}  # this one answers every request through FastAPI's stack
    guarded = Server(ServeConfig(index=str(root / "index"), port=free_port(), reload_s=0,
                                 max_body_mb=LIMIT_MB), token=TOKEN)
    try:
        yield vectors, lane, route, guarded
    finally:
        for server in (lane, route, guarded):
            server.stop()


def answer(r: httpx.Response) -> tuple[int, str, dict]:
    body = r.json()
    body.pop("took_ms", None)
    return r.status_code, r.headers["content-type"], body


def test_the_lane_answers_exactly_as_the_fastapi_route(lake) -> None:
    vectors, lane, route, _ = lake
    assert ("POST", "/search/vector") in lane.app.lanes
    v = vectors[7].tolist()
    bodies = [
        {"vector": v, "k": 5},
        {"vectors": [v, vectors[8].tolist()], "k": 3, "nprobe": 2},
        {"vector": v[:4]},  # 400: wrong dim
        {"vector": v, "vectors": [v]},  # 400: both
        {"vector": v, "k": 41},  # 400: k over --max-k
        {"vector": v, "nprobe": 0},  # 400
        {"vector": v, "min_score": 3},  # 400
        {"vector": v, "label": "car"},  # 400: filters need the table's labels
        {"vector": ["x"] * DIM},  # 422
        {"k": 5},  # 400: neither
    ]
    with httpx.Client(base_url=lane.url) as a, httpx.Client(base_url=route.url) as b:
        for body in bodies:
            fast = answer(a.post("/search/vector", json=body))
            slow = answer(b.post("/search/vector", json=body))
            assert fast == slow, (body, fast, slow)
        raw = {"content": b"{not json", "headers": {"content-type": "application/json"}}
        fast, slow = answer(a.post("/search/vector", **raw)), answer(b.post("/search/vector", **raw))
        assert fast == slow and fast[0] == 422 and "Invalid JSON" in fast[2]["error"], fast
        found = a.post("/search/vector", json={"vector": v, "k": 5}).json()
        assert found["results"][0][0]["image_id"] == "img0000007" and found["results"][0][0]["rank"] == 1
        assert [h["rank"] for h in found["results"][0]] == [1, 2, 3, 4, 5]
        assert {"width": 64, "height": 48}.items() <= found["results"][0][0].items()
        assert a.get("/openapi.json").json()["paths"]["/search/vector"]["post"]["requestBody"]


def raw_post(url: str, head: str, body: bytes) -> tuple[int, dict]:
    """One request written byte by byte on a socket (httpx always sends a length)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                data.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.partition(b"\r\n\r\n")[2])


def test_the_lane_keeps_the_token_and_the_body_limits(lake) -> None:
    vectors, _, _, guarded = lake
    body = {"vector": vectors[3].tolist(), "k": 2}
    url = f"{guarded.url}/search/vector"
    r = httpx.post(url, json=body)
    assert r.status_code == 401 and "token" in r.json()["error"]
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["results"][0][0]["image_id"] == "img0000003"
    assert httpx.post(url, json=body, cookies={"lakelens_token": TOKEN}).status_code == 200
    big = {"vectors": vectors[:200].tolist(), "k": 2}
    r = httpx.post(url, json=big, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"], r.text
    payload = json.dumps(body).encode()
    chunked = (f"POST /search/vector HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
               "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    status, answer_ = raw_post(guarded.url, chunked, b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
    assert status == 411 and "Content-Length" in answer_["error"]
    lying = (f"POST /search/vector HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
             f"Content-Type: application/json\r\nContent-Length: 10\r\nConnection: close\r\n\r\n")
    status, answer_ = raw_post(guarded.url, lying, payload)  # held to the 10 bytes it announced
    assert status == 422 and set(answer_) == {"error"}


def test_concurrent_lane_queries_share_faiss_calls_and_get_their_own_answers(lake) -> None:
    vectors, lane, _, _ = lake
    before = httpx.get(f"{lane.url}/stats").json()
    wrong: list = []

    def ask(n: int) -> None:
        with httpx.Client(base_url=lane.url, timeout=30) as c:
            for j in range(15):
                i = (n * 37 + j * 11) % N
                hits = c.post("/search/vector", json={"vector": vectors[i].tolist(), "k": 3}).json()
                if hits["results"][0][0]["image_id"] != f"img{i:07d}":
                    wrong.append((i, hits))

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(f"{lane.url}/stats").json()
    assert not wrong, wrong[:2]
    queries = after["searched_queries"] - before["searched_queries"]
    calls = after["search_calls"] - before["search_calls"]
    assert queries == 12 * 15 and calls < queries, (calls, queries)


def test_search_threads_leave_a_core_to_each_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert search_threads(1) == max(1, cores - 1)
    assert search_threads(cores) == 1 and search_threads(4 * cores) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # Ray's setting for a replica stands
    assert search_threads(1) is None


def test_the_service_sets_the_openmp_wait_policy_before_faiss_loads(tmp_path: Path) -> None:
    """Spinning OpenMP workers took the event loop's core: the policy must be in the
    environment before the CLI's serve path first imports faiss."""
    code = ("import os, sys\nimport pipelines.cli\nassert 'faiss' not in sys.modules\n"
            "from pipelines.serve import engine\nassert 'faiss' in sys.modules\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "PASSIVE"
