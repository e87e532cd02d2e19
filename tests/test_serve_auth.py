"""`lakelens serve`'s access token: generated (0600 file, URL printed once) when the service
binds beyond loopback without one, and carried by an HttpOnly SameSite=Strict cookie that
only the server sets (`GET /?token=`, `POST /auth`). Real uvicorn on loopback, the real
`lakelens serve --host 0.0.0.0` in a subprocess (reached through 127.0.0.1), real
Set-Cookie headers, Debian's headless Chromium (Selenium); the served lake is
tests.test_serve's."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import pytest

from models.errors import LakelensError
from pipelines import cli
from pipelines.lake.sources import image_id
from pipelines.serve.engine import ServeConfig
from tests import test_serve
from tests.helpers import free_port
from tests.test_serve import N, Server, chromium_driver, ids_of

served = test_serve.served  # the same module-scoped lake, index and server, built for this module

TOKEN = "cookie-token-for-this-test-only"


def cookie_of(r: httpx.Response) -> SimpleCookie:
    """The response's Set-Cookie headers, parsed by the standard library."""
    jar = SimpleCookie()
    for header in r.headers.get_list("set-cookie"):
        jar.load(header)
    return jar


def assert_token_cookie(r: httpx.Response, token: str, *, secure: bool) -> None:
    raw = r.headers.get_list("set-cookie")
    assert len(raw) == 1, raw
    morsel = cookie_of(r)["lakelens_token"]
    assert morsel.value == token
    assert morsel["httponly"] is True and morsel["samesite"] == "Strict" and morsel["path"] == "/", raw
    assert bool(morsel["secure"]) is secure, raw
    assert ("Secure" in raw[0]) is secure  # the raw header too, not only the parser's view


@pytest.fixture(scope="module")
def guarded(served):
    """A second server on the same index that requires TOKEN; and one that also names an
    https public URL."""
    _, paths, _, index_dir, _ = served
    plain = Server(ServeConfig(index=str(index_dir), port=free_port(), reload_s=0), token=TOKEN)
    public = Server(ServeConfig(index=str(index_dir), port=free_port(), reload_s=0,
                                public_url="https://lens.example.org/"), token=TOKEN)
    try:
        yield plain, public, paths
    finally:
        plain.stop()
        public.stop()


def test_a_token_url_sets_an_httponly_strict_cookie_and_redirects_without_it(guarded) -> None:
    server, _, paths = guarded
    me = image_id(str(paths[3]))
    r = httpx.get(f"{server.url}/", params={"token": TOKEN, "label": "car", "k": "8"})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/?label=car&k=8"  # the rest of the page's state stays
    assert r.headers["cache-control"] == "no-store"
    assert_token_cookie(r, TOKEN, secure=False)  # plain http: no Secure
    cookie = {"lakelens_token": cookie_of(r)["lakelens_token"].value}
    ok = httpx.get(f"{server.url}/search", params={"image_id": me}, cookies=cookie)
    assert ok.status_code == 200 and ids_of(ok.json())[0] == me
    assert httpx.get(f"{server.url}/search", params={"image_id": me}).status_code == 401
    alone = httpx.get(f"{server.url}/", params={"token": TOKEN})
    assert alone.status_code == 303 and alone.headers["location"] == "/"
    wrong = httpx.get(f"{server.url}/", params={"token": TOKEN + "x", "label": "car"})
    assert wrong.status_code == 401 and "token" in wrong.json()["error"]
    assert "set-cookie" not in wrong.headers
    page = httpx.get(f"{server.url}/")  # no token in the URL: the page, no cookie
    assert page.status_code == 200 and "<html" in page.text and "set-cookie" not in page.headers
    assert "document.cookie" not in page.text  # the page never writes the cookie itself
    # behind a TLS proxy on this machine (uvicorn trusts X-Forwarded-Proto from loopback only)
    proxied = httpx.get(f"{server.url}/", params={"token": TOKEN}, headers={"X-Forwarded-Proto": "https"})
    assert proxied.status_code == 303
    assert_token_cookie(proxied, TOKEN, secure=True)


def test_post_auth_sets_the_same_cookie_and_a_wrong_token_none(guarded) -> None:
    server, _, paths = guarded
    me = image_id(str(paths[5]))
    for kwargs in ({"json": {"token": TOKEN}}, {"data": {"token": TOKEN}}):
        r = httpx.post(f"{server.url}/auth", **kwargs)
        assert r.status_code == 200, (kwargs, r.text)
        assert_token_cookie(r, TOKEN, secure=False)
    for kwargs in ({"json": {"token": "nope-nope-nope-nope"}}, {"data": {"token": TOKEN[:-1]}},
                   {"json": {"token": ""}}, {"json": {}}, {"content": b"not json",
                                                           "headers": {"Content-Type": "application/json"}}):
        r = httpx.post(f"{server.url}/auth", **kwargs)
        assert r.status_code in (400, 401), (kwargs, r.status_code)
        assert "set-cookie" not in r.headers and "\n" not in r.json()["error"], kwargs
    assert httpx.post(f"{server.url}/auth", json={"token": "nope-nope-nope"}).status_code == 401
    bearer = httpx.get(f"{server.url}/search", params={"image_id": me},
                       headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200 and ids_of(bearer.json())[0] == me


def test_an_https_public_url_makes_the_cookie_secure(guarded) -> None:
    _, public, _ = guarded
    assert_token_cookie(httpx.get(f"{public.url}/", params={"token": TOKEN}), TOKEN, secure=True)
    assert_token_cookie(httpx.post(f"{public.url}/auth", json={"token": TOKEN}), TOKEN, secure=True)


def test_public_url_and_no_auth_flags(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, _, index_dir, _ = served
    parse = cli.build_parser().parse_args
    args = parse(["serve", "INDEX", "--public-url", "https://lens.example.org"])
    assert args.public_url == "https://lens.example.org" and args.no_auth is False
    assert parse(["serve", "INDEX", "--no-auth"]).no_auth is True
    with pytest.raises(LakelensError, match=r"^--public-url must be an http:// or https:// URL, "
                                            r"got 'lens.example.org'$"):
        ServeConfig(index="INDEX", public_url="lens.example.org")
    token = tmp_path / "token"
    token.write_text("a-token-of-twenty-chars\n")
    with pytest.raises(LakelensError, match="--no-auth"):
        cli._serve(parse(["serve", str(index_dir), "--no-auth", "--token-file", str(token)]))
    monkeypatch.setenv("LAKELENS_SERVE_TOKEN", "a-token-of-twenty-chars")
    with pytest.raises(LakelensError, match="LAKELENS_SERVE_TOKEN"):
        cli._serve(parse(["serve", str(index_dir), "--no-auth"]))


def test_the_generated_token_file_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.serve import token_dir, write_token_file

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert token_dir() == tmp_path / "run" / "lakelens"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert token_dir() == tmp_path / "home" / ".local" / "state" / "lakelens"
    where = tmp_path / "loose"
    where.mkdir(mode=0o755)
    where.chmod(0o755)
    token, path = write_token_file(where, "serve-1.token")
    assert re.fullmatch(r"[0-9a-f]{64}", token) and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(where.stat().st_mode) == 0o700  # narrowed: the directory is ours
    again, path2 = write_token_file(where, "serve-1.token")  # a stale file of ours is replaced
    assert again != token and path2 == path and path.read_text().strip() == again
    fresh, made = write_token_file(tmp_path / "new" / "deeper", "t")
    assert stat.S_IMODE(made.parent.stat().st_mode) == 0o700 and len(fresh) == 64


def _start(index_dir: Path, port: int, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", str(index_dir), "--host",
                             "0.0.0.0", "--port", str(port), "--reload-interval", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_up(proc: subprocess.Popen, url: str) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not come up")


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    return err


def _runtime_env(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An XDG_RUNTIME_DIR of the test's own (never the real home) and no token in the env."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "LAKELENS_SERVE_TOKEN"}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    return runtime, env


def _requires_generated_token(proc: subprocess.Popen, port: int, runtime: Path, me: str,
                              *, secure: bool, tries: int = 1) -> tuple[str, Path]:
    """Through 127.0.0.1: the token file is 0600 in a 0700 directory, holds 256 random bits,
    and /search is 401 without it and 200 with it (`tries` fresh connections each)."""
    url = f"http://127.0.0.1:{port}"
    [token_file] = (runtime / "lakelens").glob(f"serve-{port}-{proc.pid}.token")
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    token = token_file.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    for _ in range(tries):
        r = httpx.get(f"{url}/search", params={"image_id": me})
        assert r.status_code == 401 and "token" in r.json()["error"]
        ok = httpx.get(f"{url}/search", params={"image_id": me}, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and ids_of(ok.json())[0] == me
    landing = httpx.get(f"{url}/", params={"token": token})
    assert landing.status_code == 303
    assert_token_cookie(landing, token, secure=secure)
    return token, token_file


def _printed_once(err: str, token: str, url: str) -> None:
    """stderr shows the token once, in the URL printed to open, and nothing else of it."""
    assert err.count(token) == 1, err
    assert re.findall(r"https?://\S+/\?token=([0-9a-f]+)", err) == [token], err
    assert f"    {url}/?token={token}\n" in err, err
    assert "NO authentication" not in err and "Traceback" not in err, err


def test_beyond_loopback_without_a_token_one_is_generated_and_required(served, tmp_path: Path) -> None:
    """`--host 0.0.0.0` with no token: a 256-bit token in a 0600 file, its URL (here the
    --public-url's) printed once to stderr, required, and its file removed when SIGTERM
    stops the service; `--no-auth` serves open, with the warning."""
    _, paths, _, index_dir, _ = served
    me = image_id(str(paths[7]))
    runtime, env = _runtime_env(tmp_path)
    guarded_port, open_port = free_port(), free_port()
    guarded = _start(index_dir, guarded_port, env, "--public-url", "https://lens.example.org/")
    opened = _start(index_dir, open_port, env, "--no-auth")
    try:
        _wait_up(guarded, f"http://127.0.0.1:{guarded_port}")
        _wait_up(opened, f"http://127.0.0.1:{open_port}")
        token, token_file = _requires_generated_token(guarded, guarded_port, runtime, me, secure=True)
        free = httpx.get(f"http://127.0.0.1:{open_port}/search", params={"image_id": me})
        assert free.status_code == 200 and ids_of(free.json())[0] == me
        assert [p.name for p in (runtime / "lakelens").iterdir()] == [token_file.name]
    finally:
        err, open_err = _stop(guarded), _stop(opened)
    _printed_once(err, token, "https://lens.example.org")
    assert str(token_file) in err
    assert not token_file.exists()  # the token goes with the service
    assert "NO authentication" in open_err and "token=" not in open_err, open_err


@pytest.mark.slow  # three processes import torch: ~15 s on 2 busy cores
def test_every_worker_requires_the_one_generated_token(served, tmp_path: Path) -> None:
    import socket

    _, paths, _, index_dir, _ = served
    runtime, env = _runtime_env(tmp_path)
    port = free_port()
    proc = _start(index_dir, port, env, "--workers", "2")
    try:
        _wait_up(proc, f"http://127.0.0.1:{port}")
        # fresh connections: whichever worker answers wants the same token
        token, token_file = _requires_generated_token(proc, port, runtime, image_id(str(paths[9])),
                                                    secure=False, tries=8)
    finally:
        err = _stop(proc)
    _printed_once(err, token, f"http://{socket.gethostname()}:{port}")
    assert not token_file.exists()


def test_the_token_url_in_chromium_and_the_page_asking_for_it(guarded, tmp_path: Path) -> None:
    """Open the printed URL: the page loads at `/` without the token, its API calls succeed
    on the cookie, and the page's script cannot read the token. Then, without a cookie,
    the page asks (a wrong token is refused, the right one works) and still never sees it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    server, _, _ = guarded
    browser = chromium_driver(tmp_path)
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(f"{server.url}/?token={TOKEN}&label=car")
        wait.until(lambda b: b.current_url == f"{server.url}/?label=car")
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#label option")) == 3)  # /labels
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .hit")) == 48)  # /browse
        assert f"{N} images" in browser.find_element(By.ID, "index-meta").text  # /stats
        assert TOKEN not in browser.execute_script("return document.cookie")
        [jar] = [c for c in browser.get_cookies() if c["name"] == "lakelens_token"]
        assert jar["value"] == TOKEN and jar["httpOnly"] is True and jar["sameSite"] == "Strict"
        assert jar["secure"] is False

        browser.delete_all_cookies()
        browser.get(f"{server.url}/")
        alert = wait.until(expected_conditions.alert_is_present())
        alert.send_keys("a-wrong-token-of-some-length")
        alert.accept()
        alert = wait.until(expected_conditions.alert_is_present())  # the browse call asks again
        alert.send_keys(TOKEN)
        alert.accept()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .hit")) == 48)
        # the refused token: /stats (the call that asked) says so, and no cookie was set then
        assert browser.find_element(By.ID, "index-meta").text.startswith("wrong token")
        assert TOKEN not in browser.execute_script("return document.cookie")
        [jar] = [c for c in browser.get_cookies() if c["name"] == "lakelens_token"]
        assert jar["value"] == TOKEN and jar["httpOnly"] is True and jar["sameSite"] == "Strict"
    finally:
        browser.quit()
