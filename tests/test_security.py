"""The default posture: a local Ray on loopback with token auth, a private token file,
render writes nowhere but --out, and one decoder policy (allow-listed formats, pixel limits
from the header, byte caps, a pixel budget per upload) on every path that decodes:
annotate, `lakelens query --image` and the service's uploads."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import psutil
import pytest

from models.errors import LakelensError
from pipelines import cli
from pipelines.cluster.local import ensure_token
from pipelines.indexing import IndexBuildConfig, build
from pipelines.lake.sources import image_id as id_of
from pipelines.render import file_name, render
from pipelines.serve.engine import ServeConfig
from pipelines.synth import write_lake
from tests.helpers import free_port
from tests.test_coco import _rows_from_gt, _write
from tests.test_serve import Server
from tests.zoo import write_allowed, write_blank_png, write_hostile

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _family(pid: int) -> set[int]:
    me = psutil.Process(pid)
    return {pid} | {p.pid for p in me.children(recursive=True)}


def test_the_local_ray_lakelens_starts_listens_on_loopback_only(ray_local) -> None:
    @ray_local.remote(num_cpus=1)
    def ping() -> int:
        return os.getpid()

    worker = ray_local.get(ping.remote())  # a worker process is up and serving too
    family = _family(os.getpid())
    assert worker in family
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in family]
    assert len(listening) >= 3, listening  # GCS, raylet, workers: the check saw Ray's sockets
    exposed = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in listening
               if c.laddr.ip not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_token_auth_is_on_and_its_token_file_is_private(ray_local) -> None:
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert get_authentication_mode() == AuthenticationMode.TOKEN
    mode = stat.S_IMODE(os.stat(os.environ["RAY_AUTH_TOKEN_PATH"]).st_mode)
    assert mode == 0o600, oct(mode)


def test_a_missing_token_is_made_0600_and_a_readable_one_narrowed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    ensure_token()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    assert len(token) == 64 and int(token, 16)  # 256 random bits, hex
    path.chmod(0o644)
    ensure_token()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == token  # narrowed, not replaced


@pytest.mark.parametrize("image_id", ["../../escaped", "/etc/escaped", "a/../../b", ".hidden",
                                      "..", "", "x\x00y", "c:\\evil", "é"])
def test_render_names_stay_plain_file_names(image_id: str) -> None:
    name = file_name(image_id)
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith(".") and name.endswith(".png")


def test_render_never_writes_outside_out_whatever_the_ids_say(tmp_path: Path) -> None:
    lake = write_lake(tmp_path / "lake", images=3, seed=2)
    rows = _rows_from_gt(lake)
    hostile = ["../../escaped", str(tmp_path / "absolute"), "plain-id"]
    for row, image_id in zip(rows, hostile, strict=False):
        row["image_id"] = image_id
    results = _write(tmp_path / "res", rows)
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    out = tmp_path / "deep" / "png"
    written, failed = render(str(results), str(out))
    assert (written, failed) == (3, 0)
    new = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert len(new) == 3 and all(p.parent == out for p in new), new
    assert (out / "plain-id.png").exists()


# -- the decoder policy through query and serve (annotate: the zoo in test_annotate) ------

MAX_IMAGE_MB = 1.0


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory):
    """An index of one valid image per allowed format (real tiny-embedder vectors committed
    to a real table), served by a real uvicorn; and the hostile files."""
    import numpy as np

    from models.decode import decode_image
    from models.embedding import decode_sizes
    from models.predict import EmbeddingPredictor
    from tests.helpers import write_results

    root = tmp_path_factory.mktemp("policy")
    allowed = write_allowed(root / "lake")
    hostile = write_hostile(root / "hostile", max_image_mb=MAX_IMAGE_MB)
    predictor = EmbeddingPredictor("tiny", weights="random")
    short, long = decode_sizes("tiny")
    vectors = predictor([decode_image(p.read_bytes(), short=short, long=long).pixels
                         for p in allowed.values()])
    out = write_results(root / "out", np.stack(vectors).astype(np.float32),
                        ids=[id_of(str(p)) for p in allowed.values()],
                        embedder=("tiny", predictor.info.weights_id))
    index = root / "index"
    build(IndexBuildConfig(results=str(out), out=str(index), factory="Flat"))
    server = Server(ServeConfig(index=str(index), port=free_port(), reload_s=0,
                                max_pixels=100_000_000))  # annotate's default: the same messages
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield allowed, hostile, index, client, root
    server.stop()


def test_query_image_refuses_what_annotate_refuses(policy, capsys: pytest.CaptureFixture) -> None:
    allowed, hostile, index, _, _ = policy
    assert {c.name for c in hostile} == {"eps_named.jpg", "pdf_named.png", "svg_named.png", "huge.png",
                                         "zip_bomb.png", "over_cap.bmp"}
    for case in hostile:
        args = cli.build_parser().parse_args(["query", str(index), "--image", str(case.path),
                                              "--max-image-mb", str(MAX_IMAGE_MB)])
        with pytest.raises(LakelensError) as info:
            cli._query(args)
        message = str(info.value)
        assert message.startswith(f"cannot read query image {str(case.path)!r}: {case.error_type}: ")
        assert all(n in message for n in case.needles) and "\n" not in message, message
    args = cli.build_parser().parse_args(["query", str(index), "--image", str(allowed["AVIF"]), "-k", "1",
                                          "--max-image-mb", str(MAX_IMAGE_MB), "--json"])
    assert cli._query(args) == 0
    assert id_of(str(allowed["AVIF"])) in capsys.readouterr().out  # found itself


def test_uploads_outside_the_policy_are_a_4xx_and_the_service_keeps_answering(policy) -> None:
    allowed, hostile, _, client, root = policy
    for case in hostile:
        if case.stage != "decode":  # an upload's byte cap is --max-body-mb (413, in test_serve)
            continue
        r = client.post("/search/image", files=[("image", (case.name, case.path.read_bytes(), "image/jpeg"))])
        assert r.status_code == 400, (case.name, r.text)
        message = r.json()["error"]
        assert message.startswith("upload 1 is not a readable image: ")
        assert all(n in message for n in case.needles), (case.name, message)
    # Three 36 MP PNGs (each under --max-pixels) are 108 MP together: over the 100 MP budget,
    # refused from their headers before any is decoded.
    blank = write_blank_png(root / "blank.png", 6000, 6000, bit_depth=1).read_bytes()
    r = client.post("/search/image", files=[("image", (f"b{i}.png", blank, "image/png")) for i in range(3)])
    assert r.status_code == 413, r.text
    assert r.json()["error"] == ("the 3 uploaded image(s) hold 108000000 pixels together, over the budget "
                                 "of 100000000 pixels per request (--max-request-pixels)")
    # Still answering: every allowed format in one request, each finds itself first.
    files = [("image", (p.name, p.read_bytes(), "application/octet-stream")) for p in allowed.values()]
    r = client.post("/search/image", params={"k": 1}, files=files)
    assert r.status_code == 200, r.text
    assert [hits[0]["image_id"] for hits in r.json()["results"]] == [id_of(str(p)) for p in allowed.values()]
    assert client.get("/health").json()["status"] == "ok"


def test_the_policy_flags_reach_their_configs(tmp_path: Path) -> None:
    parse = cli.build_parser().parse_args
    lake = write_allowed(tmp_path / "lake")["PNG"].parent
    with pytest.raises(LakelensError, match=r"^--max-image-mb must be > 0, got 0.0$"):
        cli._annotate(parse(["annotate", str(lake), "--out", str(tmp_path / "o"), "--max-image-mb", "0"]))
    assert parse(["annotate", str(lake), "--out", "o"]).max_image_mb == 64.0
    with pytest.raises(LakelensError, match=r"^--max-image-mb must be > 0, got -1.0$"):
        cli._query(parse(["query", str(tmp_path), "--image", str(lake / "a.png"), "--max-image-mb", "-1"]))
    args = parse(["serve", "INDEX", "--max-request-pixels", "1234"])
    assert args.max_request_pixels == 1234
    assert cli.build_parser().parse_args(["serve", "INDEX"]).max_request_pixels == ServeConfig(
        index="INDEX").max_request_pixels == 100_000_000
    with pytest.raises(LakelensError, match="--max-request-pixels must be >= 1, got 0"):
        ServeConfig(index="INDEX", max_request_pixels=0)
