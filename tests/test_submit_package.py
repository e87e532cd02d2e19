"""What `lakelens submit` uploads: the project's own code by default (an include-list),
never a credential-shaped file unless named with --allow-file, checked in the zip that
goes up (the job's working_dir is exactly that zip)."""

from __future__ import annotations

import base64
import json
import time
import zipfile
from pathlib import Path

import pytest

from models.errors import LakelensError
from pipelines.cluster.package import INCLUDE, build_package
from pipelines.cluster.submit import SubmitConfig, project_dir, submit
from tests.helpers import free_port
from tests.test_cli import _one_line_error, lakelens

# Fake, but shaped like the real thing (AWS's documented example key id among them).
PEM_RSA = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo\n"
           "-----END RSA PRIVATE KEY-----\n")
OPENSSH = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
           "-----END OPENSSH PRIVATE KEY-----\n")
SERVICE_ACCOUNT = json.dumps({
    "type": "service_account", "project_id": "proj-123", "private_key_id": "0123abcd",
    "private_key": ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n"
                    "-----END PRIVATE KEY-----\n"),
    "client_email": "job@proj-123.iam.gserviceaccount.com"}, indent=2)
KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- cluster:
    server: https://10.0.0.1:6443
  name: prod
users:
- name: admin
  user:
    client-key-data: LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLQo=
contexts: []
"""
DOCKER_AUTH = base64.b64encode(b"robot:s3cr3t-passw0rd").decode()

CREDENTIALS = {  # relative path: content; each must stop the upload
    "proj-123.json": SERVICE_ACCOUNT,
    "keys/deploy": OPENSSH,
    "certs/server.txt": PEM_RSA,
    "settings.py": 'KEY_ID = "AKIAIOSFODNN7EXAMPLE"\n',
    "conf/session.ini": "[default]\nid = ASIAQWERTYUIOPASDFGH\n",
    "conf/aws.ini": ("[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\n"
                     "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"),
    ".pypirc": "[distutils]\nindex-servers = pypi\n[pypi]\nusername = __token__\npassword = hunter2\n",
    "pkg/.npmrc": "registry=https://registry.npmjs.org/\n//registry.npmjs.org/:_authToken=abcdef0123456789\n",
    "sub/_netrc": "machine example.com\n  login alice\n  password hunter2\n",
    "notes/hosts.txt": "machine pypi.org login alice password hunter2\n",
    ".kube/config": KUBECONFIG,
    "kubeconfig.yaml": KUBECONFIG.replace("client-key-data: ", "token: "),
    "conf/git-store": "https://alice:hunter2@github.com\n",  # git's credential store, any name
    ".docker/config.json": json.dumps({"auths": {"ghcr.io": {"auth": DOCKER_AUTH}}}),
    "deploy/prod.yaml": KUBECONFIG,  # a kubeconfig by content alone
    "scripts/release.sh": "export GH_TOKEN=ghp_" + "Zx9" * 12 + "\n",
}
DENY_LISTED = (".env", ".env.local", "sub/.netrc", "id_rsa", "tls/prod.pem", "aws_credentials.json",
               ".git-credentials", "conf/client_secret.json")


def _project(root: Path) -> Path:
    """An ordinary project: code, config, docs, a binary file, no secrets."""
    (root / "pipelines").mkdir(parents=True)
    (root / "pipelines" / "__init__.py").write_text("")
    (root / "pipelines" / "cli.py").write_text(
        "import os\nTOKEN_ENV = 'RAY_AUTH_TOKEN'  # read from the environment, never stored\n"
        "def password_prompt():\n    return input('password: ')\n")
    (root / "pyproject.toml").write_text('[project]\nname = "demo"\n')
    (root / "README.md").write_text("Put `password` in ~/.netrc and keys in ~/.ssh; see `ray start`.\n")
    (root / "deploy.yaml").write_text("apiVersion: v1\nkind: ConfigMap\ndata:\n  token: from-secret\n")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + b"AKIAIOSFODNN7EXAMPLE" + bytes(500))
    return root


def _zipped(pkg) -> list[str]:
    with zipfile.ZipFile(pkg.path) as zf:
        return sorted(zf.namelist())


def _submit_here(working_dir: Path, *allow: str) -> None:
    """`submit` as the CLI calls it, to an address where nothing listens: a refusal comes
    before any connection is tried."""
    submit(SubmitConfig(args=("results", "/data/out"), address=f"http://127.0.0.1:{free_port()}",
                        working_dir=str(working_dir), allow_files=allow, agent_wait_s=0.5))


@pytest.mark.parametrize("rel", sorted(CREDENTIALS))
def test_each_kind_of_credential_stops_the_upload_with_one_line(tmp_path: Path, rel: str) -> None:
    root = _project(tmp_path / "proj")
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(CREDENTIALS[rel])
    with pytest.raises(LakelensError) as e:
        _submit_here(root)
    message = str(e.value)
    assert "\n" not in message and rel in message and "credential" in message, message
    assert "--allow-file" in message and ".rayignore" in message, message


def test_the_refusal_names_a_few_files_and_counts_the_rest(tmp_path: Path) -> None:
    root = _project(tmp_path / "proj")
    for rel, text in CREDENTIALS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    with pytest.raises(LakelensError, match=rf"{len(CREDENTIALS)} credential-shaped files") as e:
        build_package(root, tmp_path / "stage")
    message = str(e.value)
    assert "\n" not in message and f"and {len(CREDENTIALS) - 3} more" in message, message
    assert "(a docker registry login)" in message and "(a kubeconfig)" in message  # why, not only which
    assert not list((tmp_path / "stage").glob("*"))  # no half-built package left behind


def test_an_ordinary_project_goes_up_whole_and_deny_listed_names_never(tmp_path: Path) -> None:
    root = _project(tmp_path / "proj")
    for rel in DENY_LISTED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(PEM_RSA)  # would be refused if it were ever looked at
    pkg = build_package(root, tmp_path / "stage")
    assert _zipped(pkg) == ["README.md", "deploy.yaml", "logo.png", "pipelines/__init__.py",
                            "pipelines/cli.py", "pyproject.toml"]
    with zipfile.ZipFile(pkg.path) as zf:  # the bytes, not only the names
        assert zf.read("pipelines/cli.py") == (root / "pipelines" / "cli.py").read_bytes()
    assert pkg.nbytes == sum((root / rel).stat().st_size for rel in pkg.files)
    again = build_package(root, tmp_path / "stage2")  # same files, same zip: Ray uploads it once
    assert again.path.read_bytes() == pkg.path.read_bytes()


def test_allow_file_lets_exactly_the_named_file_through(tmp_path: Path) -> None:
    root = _project(tmp_path / "proj")
    (root / "conf").mkdir()
    (root / "conf" / "tls.txt").write_text(PEM_RSA)
    (root / "conf" / "sa.json").write_text(SERVICE_ACCOUNT)
    with pytest.raises(LakelensError) as e:
        build_package(root, tmp_path / "s1", allow_files=("conf/tls.txt",))
    assert "conf/sa.json" in str(e.value) and "conf/tls.txt" not in str(e.value)
    pkg = build_package(root, tmp_path / "s2", allow_files=("conf/tls.txt", str(root / "conf" / "sa.json")))
    assert {"conf/tls.txt", "conf/sa.json"} <= set(_zipped(pkg))
    with pytest.raises(LakelensError, match=r"--allow-file conf/nope\.txt.*no such file"):
        build_package(root, tmp_path / "s3", allow_files=("conf/tls.txt", "conf/sa.json", "conf/nope.txt"))


def test_allow_file_reaches_submit_from_the_command_line(tmp_path: Path) -> None:
    root = _project(tmp_path / "proj")
    (root / ".pypirc").write_text(CREDENTIALS[".pypirc"])
    closed = f"http://127.0.0.1:{free_port()}"
    refused = lakelens("submit", "--address", closed, "--working-dir", str(root), "--", "results", "/d/o")
    _one_line_error(refused, ".pypirc")
    assert "credential" in refused.stderr and "--allow-file" in refused.stderr


def test_the_default_upload_is_the_include_list(tmp_path: Path) -> None:
    root = _project(tmp_path / "proj")
    (root / "notes").mkdir()
    (root / "notes" / "data.csv").write_text("a,b\n1,2\n")
    (root / "models").mkdir()
    (root / "models" / "m.py").write_text("X = 1\n")
    (root / "scratch.py").write_text("print('mine')\n")
    pkg = build_package(root, tmp_path / "stage", include=INCLUDE)
    assert _zipped(pkg) == ["models/m.py", "pipelines/__init__.py", "pipelines/cli.py", "pyproject.toml"]
    (root / "notes" / "sa.json").write_text(SERVICE_ACCOUNT)  # outside the include-list: not even read
    assert _zipped(build_package(root, tmp_path / "stage2", include=INCLUDE)) == _zipped(pkg)


def test_this_project_packs_its_own_code_and_nothing_else(tmp_path: Path) -> None:
    root = project_dir()
    assert root is not None
    start = time.perf_counter()
    pkg = build_package(root, tmp_path / "stage", include=INCLUDE)
    took = time.perf_counter() - start
    names = _zipped(pkg)
    assert {"pipelines/cli.py", "pipelines/serve/page.html", "models/errors.py", "index/build.py",
            "pyproject.toml", "cluster.yaml"} <= set(names)
    assert {n.split("/", 1)[0] for n in names} == {"pipelines", "models", "index", "pyproject.toml",
                                                   "cluster.yaml"}
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert len(names) > 50 and took < 5, (len(names), took)
