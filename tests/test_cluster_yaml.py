"""cluster.yaml, the AWS cluster-launcher config, checked offline: Ray's own schema and
defaults merge (prepare_config + validate_config, which contact no cloud), Ray's label
syntax, Ray's rsync arguments run through a real rsync, and lakelens's rules for the
cluster (roles, loopback dashboard, token auth, extras and pins)."""

from __future__ import annotations

import copy
import fnmatch
import importlib.metadata
import os
import re
import shlex
import shutil
import stat
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray._private.label_utils import validate_node_label_syntax, validate_node_labels
from ray.autoscaler._private.command_runner import SSHCommandRunner
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "cluster.yaml"
ROLE = "lakelens/role"
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
GPU_FAMILY = re.compile(r"^(g\d|p\d|inf\d|trn\d|dl\d)")  # EC2 accelerator instance families
# What Ray's own key file mount looks like (~/.ssh/ray-autoscaler_*.pem -> ~/ray_bootstrap_key.pem)
RAY_KEY_NAME = "ray-autoscaler_us-west-2.pem"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def prepared(raw: dict) -> dict:
    """What `ray up` validates: the file merged with Ray's aws defaults."""
    return prepare_config(copy.deepcopy(raw))


def gpus(node_type: dict) -> int:
    return node_type.get("resources", {}).get("GPU", 0)


def workers(cfg: dict) -> dict[str, dict]:
    return {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}


def ray_start(commands: list[str]) -> str:
    """The one start command that runs `ray start`."""
    found = [c for c in commands if "ray start" in c]
    assert len(found) == 1, commands
    return found[0]


def env_values(command: str, name: str) -> list[str]:
    """The values the shell assigns to `name` in `command` before `ray start`, in order
    (quotes removed): the last one is what `ray start` sees."""
    before = command[:command.index("ray start")] if "ray start" in command else command
    return [w.split("=", 1)[1] for w in shlex.split(before.replace(";", " ")) if w.startswith(name + "=")]


def install_command(commands: list[str]) -> str:
    found = [c for c in commands if c.startswith("pip install") and "-e " in c]
    assert len(found) == 1, commands
    return found[0]


def setup_lists(cfg: dict) -> dict[str, list[str]]:
    """The setup commands each node type actually runs: a node type's own
    worker_setup_commands replace the global lists (the head runs head_setup_commands)."""
    lists = {cfg["head_node_type"]: cfg["head_setup_commands"]}
    for name, t in workers(cfg).items():
        lists[name] = t.get("worker_setup_commands", cfg["worker_setup_commands"])
    return lists


def token_mount(cfg: dict) -> tuple[str, str]:
    """(remote, local) of the file mount that carries the Ray token."""
    found = [(r, loc) for r, loc in cfg["file_mounts"].items() if r.endswith("auth_token")]
    assert len(found) == 1, cfg["file_mounts"]
    return found[0]


# --- Ray's validation -------------------------------------------------------------------


def test_validates_with_rays_schema(prepared: dict) -> None:
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"]


def _misspelled_top_level_key(c: dict) -> None:
    c["max_worker"] = c.pop("max_workers")


def _max_workers_as_string(c: dict) -> None:
    c["available_node_types"]["gpu-model"]["max_workers"] = "8"


def _label_value_not_a_string(c: dict) -> None:
    c["available_node_types"]["gpu-model"]["labels"] = {ROLE: 1}


def _setup_commands_per_node_type(c: dict) -> None:
    # Node types take worker_setup_commands only; setup_commands there is a typo Ray refuses.
    c["available_node_types"]["cpu-decode"]["setup_commands"] = ["true"]


def _unknown_head_type(c: dict) -> None:
    c["head_node_type"] = "no-such-type"


def _min_workers_over_global_max(c: dict) -> None:
    c["available_node_types"]["cpu-decode"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("mutate, error", [
    (_misspelled_top_level_key, jsonschema.ValidationError),
    (_max_workers_as_string, jsonschema.ValidationError),
    (_label_value_not_a_string, jsonschema.ValidationError),
    (_setup_commands_per_node_type, jsonschema.ValidationError),
    (_unknown_head_type, ValueError),
    (_min_workers_over_global_max, ValueError),
])
def test_validation_rejects_a_broken_copy(raw: dict, mutate: Callable[[dict], None],
                                          error: type[Exception]) -> None:
    """The positive check means something: the same path refuses a broken copy."""
    bad = copy.deepcopy(raw)
    mutate(bad)
    with pytest.raises(error):
        validate_config(prepare_config(bad))


def test_rays_aws_defaults_do_not_leak_in(prepared: dict) -> None:
    """The shallow defaults merge keeps Ray's aws setup commands for any key the file omits:
    a nightly Ray wheel (setup_commands) and boto3 (head_setup_commands), and a dashboard
    on 0.0.0.0 (head_start_ray_commands). The file sets all of these itself."""
    commands = (prepared["head_setup_commands"] + prepared["worker_setup_commands"]
                + prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"])
    text = "\n".join(commands)
    assert "ray-wheels" not in text and "dev0" not in text
    assert "boto3" in install_command(prepared["head_setup_commands"])  # the head's AWS provider


# --- node types and roles ---------------------------------------------------------------


def test_role_label_is_the_one_lakelens_schedules_by() -> None:
    from pipelines.cluster.placement import ROLE_LABEL

    assert ROLE_LABEL == ROLE


def test_head_has_no_gpu_and_no_worker_role(raw: dict) -> None:
    head = raw["available_node_types"][raw["head_node_type"]]
    assert gpus(head) == 0
    assert not GPU_FAMILY.match(head["node_config"]["InstanceType"])  # nothing to autodetect
    assert head["labels"][ROLE] == "head"
    # A CPU count in the file, small, so that Ray does not advertise every core of the head.
    assert 0 <= head["resources"]["CPU"] <= 4


def test_exactly_one_gpu_type_labelled_model_that_autoscales(raw: dict) -> None:
    gpu_types = {n: t for n, t in workers(raw).items() if gpus(t) > 0}
    assert len(gpu_types) == 1, gpu_types
    (t,) = gpu_types.values()
    assert t["labels"][ROLE] == "model"
    assert GPU_FAMILY.match(t["node_config"]["InstanceType"])
    assert t["max_workers"] > t.get("min_workers", 0)
    labelled_model = [n for n, t in raw["available_node_types"].items()
                      if t.get("labels", {}).get(ROLE) == "model"]
    assert labelled_model == list(gpu_types)


def test_cpu_decode_type_labelled_decode(raw: dict) -> None:
    decode = {n: t for n, t in workers(raw).items() if t.get("labels", {}).get(ROLE) == "decode"}
    assert len(decode) == 1, decode
    (t,) = decode.values()
    assert gpus(t) == 0
    assert not GPU_FAMILY.match(t["node_config"]["InstanceType"])
    assert t["resources"]["CPU"] > 0
    assert t["max_workers"] > t.get("min_workers", 0)


def test_labels_pass_rays_label_checks(raw: dict) -> None:
    for name, t in raw["available_node_types"].items():
        assert t.get("labels"), f"{name} has no labels"
        validate_node_labels(t["labels"])  # no reserved ray.io/ prefix
        validate_node_label_syntax(t["labels"])  # Kubernetes-style key and value syntax


# --- start commands: loopback dashboard, token auth --------------------------------------


def test_dashboard_on_loopback_only(prepared: dict) -> None:
    head = ray_start(prepared["head_start_ray_commands"])
    assert "--head" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head  # or no workers launch
    for command in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]:
        assert "0.0.0.0" not in command


def test_token_auth_in_every_ray_start(prepared: dict) -> None:
    remote, _ = token_mount(prepared)
    for commands in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        command = ray_start(commands)
        assert env_values(command, "RAY_AUTH_MODE") == ["token"], command
        # Ray opens this path as given (no ~ expansion): $HOME, expanded by the shell,
        # pointing at the file the token mount writes.
        assert env_values(command, "RAY_AUTH_TOKEN_PATH") == ["$HOME/" + remote.removeprefix("~/")], command
        assert "RAY_AUTH_TOKEN=" not in command  # never the token itself


def test_token_file_comes_from_outside_the_repo_and_is_locked_down(prepared: dict) -> None:
    remote, local = token_mount(prepared)
    assert local.startswith("~/") or os.path.isabs(local), local  # not in the synced project
    assert not Path(local).expanduser().resolve().is_relative_to(ROOT)
    for name, commands in setup_lists(prepared).items():
        assert any(f"chmod 600 {remote}" in c and f"test -s {remote}" in c for c in commands), name


def test_no_secret_in_the_file() -> None:
    text = CONFIG.read_text()
    assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text)  # a token (Ray's are 64 hex digits)
    assert not re.search(r"RAY_AUTH_TOKEN=", text)
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(?i)aws_secret_access_key|aws_session_token|PRIVATE KEY|Bearer ", text)


# --- setup: the project, extras, pins ---------------------------------------------------


def test_every_worker_type_lists_its_own_setup(raw: dict) -> None:
    """A node type's worker_setup_commands replace the global ones: explicit per type, so
    no worker type silently runs none."""
    for name, t in workers(raw).items():
        assert t.get("worker_setup_commands"), name


def test_gpu_nodes_get_the_gpu_extra_and_cpu_nodes_the_cpu_extra(prepared: dict) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("faiss-gpu") for d in extras["gpu"])
    assert any(d.startswith("faiss-cpu") for d in extras["cpu"])
    project = next(r for r, loc in prepared["file_mounts"].items() if loc in (".", "./"))
    for name, commands in setup_lists(prepared).items():
        command = install_command(commands)
        t = prepared["available_node_types"][name]
        extra, other = ("gpu", "cpu") if gpus(t) > 0 else ("cpu", "gpu")
        assert f'-e "$HOME/{project.removeprefix("~/")}[{extra}]"' in command, (name, command)
        assert f"[{other}]" not in command, (name, command)


def test_installs_pin_torch_and_the_local_ray(prepared: dict) -> None:
    """Pinned torch, and the cluster's Ray is the Ray that runs `ray up` here."""
    ray_pin = f"=={importlib.metadata.version('ray')}"
    for name, commands in setup_lists(prepared).items():
        words = shlex.split(install_command(commands))
        for pin in TORCH_PINS:
            assert pin in words, (name, pin)
        assert any(w.startswith("ray[") and w.endswith(ray_pin) for w in words), (name, words)


# --- rsync: what the file mounts carry --------------------------------------------------


def test_excludes_spare_rays_own_mounts(prepared: dict) -> None:
    """A bare pattern also applies to single-file mounts: '*.pem' would drop Ray's SSH key."""
    _, local = token_mount(prepared)
    for name in (RAY_KEY_NAME, os.path.basename(local), "ray-bootstrap-abc123"):
        assert not any(fnmatch.fnmatch(name, p) for p in prepared["rsync_exclude"]), name


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")
def test_rsync_carries_code_not_secrets(prepared: dict, tmp_path: Path) -> None:
    """Ray's own rsync arguments for these rules, run by rsync against a scratch tree."""
    options = {"rsync_exclude": prepared["rsync_exclude"], "rsync_filter": prepared["rsync_filter"]}
    args = object.__new__(SSHCommandRunner)._create_rsync_filter_args(options=options)
    src = tmp_path / "src"
    files = {
        "pipelines/cli.py": True, "README.md": True, "tests/test_x.py": True,
        ".git/config": False, ".venv/bin/python": False, "pipelines/__pycache__/cli.pyc": False,
        "lakelens.egg-info/PKG-INFO": False, "out/table/part-0.parquet": False,
        "demo-out/x.png": False, ".env": False, "deploy/.env.prod": False,
        "aws_credentials.json": False, "deploy/certs/server.pem": False,
        "ignored-by-git.log": False,
    }
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    (src / ".gitignore").write_text("*.log\n")
    key = tmp_path / RAY_KEY_NAME
    token = tmp_path / "token"
    for f in (key, token):
        f.write_text("secret")
        f.chmod(0o600)
    dst = tmp_path / "dst"
    dst.mkdir()

    def rsync(source: str, target: Path) -> None:
        subprocess.run(["rsync", "-avz", *args, source, str(target)], check=True, capture_output=True)

    rsync(f"{src}/", dst / "lakelens")  # a directory mount: Ray adds the trailing slash
    rsync(str(key), dst / "ray_bootstrap_key.pem")
    rsync(str(token), dst / "auth_token")
    carried = {rel for rel in files if (dst / "lakelens" / rel).exists()}
    assert carried == {rel for rel, keep in files.items() if keep}
    assert (dst / "ray_bootstrap_key.pem").exists()  # Ray's SSH key to the workers survives
    assert stat.S_IMODE((dst / "auth_token").stat().st_mode) == 0o600  # rsync -a keeps the mode
