"""The default posture: a local Ray on loopback with token auth, a private token file,
render writes nowhere but --out."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psutil
import pytest

from pipelines.cluster.local import ensure_token
from pipelines.render import file_name, render
from pipelines.synth import write_lake
from tests.test_coco import _rows_from_gt, _write

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
