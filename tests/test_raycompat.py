"""Every private Ray symbol lakelens relies on, looked up and exercised here so that a Ray
upgrade that moves or changes one fails this file by name, not a user's run."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import ray

from pipelines.cluster import raycompat

VERSION = f"Ray {ray.__version__}"


def _moved(symbol: str, why: object) -> str:
    return (f"{VERSION}: {symbol} moved or changed ({why}); lakelens relies on it in "
            "pipelines/cluster/raycompat.py: update that module")


@pytest.mark.parametrize("symbol", raycompat.PRIVATE_SYMBOLS)
def test_every_private_symbol_is_where_raycompat_expects_it(symbol: str) -> None:
    module_name, _, attr = symbol.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        pytest.fail(_moved(symbol, e))
    assert hasattr(module, attr), _moved(symbol, f"{module_name} has no {attr}")


def test_only_raycompat_touches_private_ray() -> None:
    root = Path(raycompat.__file__).resolve().parents[1]
    offenders = [f"{p.relative_to(root.parent)}:{n}" for p in root.rglob("*.py") if p.name != "raycompat.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if "ray._" in line or "_private" in line]
    assert not offenders, offenders


def test_reload_auth_mode_makes_this_process_read_the_environment_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._raylet import AuthenticationMode, get_authentication_mode

    try:
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        raycompat.reload_auth_mode()
        assert get_authentication_mode() == AuthenticationMode.DISABLED, _moved(
            "ray._raylet.Config.initialize", "RAY_AUTH_MODE=disabled was not read again")
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        raycompat.reload_auth_mode()
        assert get_authentication_mode() == AuthenticationMode.TOKEN, _moved(
            "ray._raylet.Config.initialize", "RAY_AUTH_MODE=token was not read again")
    finally:
        monkeypatch.undo()
        raycompat.reload_auth_mode()


def test_forget_cached_token_makes_ray_read_the_token_file_again(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._raylet import AuthenticationTokenLoader

    path = tmp_path / "auth_token"
    path.write_text("a" * 64)
    try:
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        raycompat.reload_auth_mode()
        raycompat.forget_cached_token()
        assert AuthenticationTokenLoader.instance().get_raw_token() == "a" * 64
        path.write_text("b" * 64)
        raycompat.forget_cached_token()
        assert AuthenticationTokenLoader.instance().get_raw_token() == "b" * 64, _moved(
            "ray._raylet.AuthenticationTokenLoader.reset_cache", "the old token stayed cached")
    finally:
        monkeypatch.undo()
        raycompat.reload_auth_mode()
        raycompat.forget_cached_token()


def test_loopback_node_address_is_what_ray_picks() -> None:
    from ray._private import ray_constants, services

    before = ray_constants.ENABLE_RAY_CLUSTER
    try:
        raycompat.use_loopback_node_address()
        assert services.get_node_ip_address() == "127.0.0.1", _moved(
            "ray._private.ray_constants.ENABLE_RAY_CLUSTER", "Ray no longer picks 127.0.0.1 with it off")
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def test_package_walk_follows_rays_ignore_rules(tmp_path: Path) -> None:
    for rel in ("a.py", "skip.log", "sub/b.py", "sub/c.tmp", "sub/deep/d.py", "junk/e.py", "kept/f.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / ".gitignore").write_text("*.log\n")
    (tmp_path / "sub" / ".rayignore").write_text("*.tmp\ndeep/\n")
    files = raycompat.package_walk(tmp_path, ["junk", ".gitignore", ".rayignore"],
                                   skip=lambda p: p.name == "kept", include_gitignore=True)
    got = sorted(str(p.relative_to(tmp_path)) for p in files)
    assert got == ["a.py", "sub/b.py"], _moved("ray._private.runtime_env.packaging._dir_travel", got)
    every = raycompat.package_walk(tmp_path, [], include_gitignore=False)
    assert "skip.log" in {str(p.relative_to(tmp_path)) for p in every}  # .gitignore off: kept


def test_current_cluster_file_round_trips(tmp_path: Path) -> None:
    raycompat.write_current_cluster("127.0.0.1:6390", temp_dir=str(tmp_path))
    assert raycompat.current_cluster_file(str(tmp_path)) == str(tmp_path / "ray_current_cluster")
    assert (tmp_path / "ray_current_cluster").read_text().strip() == "127.0.0.1:6390"
    assert raycompat.read_current_cluster(str(tmp_path)) == "127.0.0.1:6390", _moved(
        "ray._private.utils.read_ray_address", "it did not read what write_ray_address wrote")
    os.remove(tmp_path / "ray_current_cluster")
    assert raycompat.read_current_cluster(str(tmp_path)) is None


def test_worker_log_handlers_can_be_wrapped() -> None:
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    seen: list[list[str]] = []
    name = "lakelens-raycompat-test"
    dispatcher.add_handler(name, lambda data: seen.append(data["lines"]))
    try:
        def drop_noise(handle):
            return lambda data: handle({**data, "lines": [x for x in data["lines"] if "noise" not in x]})

        assert raycompat.wrap_worker_log_handler(name, drop_noise), _moved(
            "ray._private.ray_logging.global_worker_stdstream_dispatcher", "no handler to wrap")
        dispatcher.emit({"lines": ["kept", "noise here"], "pid": 1})
        assert seen == [["kept"]], _moved("ray._private.ray_logging.WorkerStandardStreamDispatcher", seen)
        assert not raycompat.wrap_worker_log_handler("no-such-handler", drop_noise)
    finally:
        dispatcher.remove_handler(name)
