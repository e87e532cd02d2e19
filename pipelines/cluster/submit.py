"""`lakelens submit` and `lakelens jobs`: lakelens commands as Ray jobs (the Jobs API).

The project directory goes up as the job's `working_dir` (without virtual environments,
outputs, caches, `.git` or anything that looks like a secret), so the cluster runs the
code the laptop has; the job runs `python -m pipelines.cli ARGS` there, the same command
a laptop runs. The Jobs API is reached over HTTP(S): through `ray dashboard cluster.yaml`
(a port-forward to 127.0.0.1:8265) or an authenticated HTTPS proxy; plain `http://` to
another host is refused unless the user says `--allow-insecure-http`, since the Ray
token travels in a header. The token is read by Ray's own loader (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and never put on a command line, in a log or in
the job's metadata.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from models.errors import LakelensError
from pipelines.cluster.local import AUTH_MODE_ENV, TOKEN_ENV, secure_file, token_path
from pipelines.cluster.net import is_loopback

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # `ray dashboard cluster.yaml` forwards here
MAX_PACKAGE_BYTES = 100 * 1024 * 1024  # the Jobs API refuses larger uploads
SUBMITTABLE = ("annotate", "results", "index", "query", "eval", "export", "render", "synth", "train")
# gitignore syntax, on top of the project's .gitignore (which Ray honours too)
EXCLUDES = (
    ".git", ".venv", "venv", ".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx",
    "*credentials*", "*secret*", ".aws", ".ssh", ".netrc", "id_rsa*", "auth_token",
    "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", ".mypy_cache", "*.egg-info",
    "demo-out", "out", "outputs", "benchmarks/results", "*.ckpt", "*.pt", "*.pth", "*.safetensors",
    "_delta_log", "node_modules",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PATH_FLAGS = ("--out", "--index", "--gt", "--data")  # where a job writes or reads data


@dataclass(frozen=True)
class SubmitConfig:
    args: tuple[str, ...]                # the lakelens command the job runs
    address: str = DEFAULT_ADDRESS
    wait: bool = True                    # stream logs until the job ends
    working_dir: str | None = None       # default: the lakelens project this code runs from
    allow_insecure_http: bool = False
    submission_id: str | None = None

    def __post_init__(self) -> None:
        if not self.args:
            raise LakelensError("submit: name the lakelens command to run, e.g. "
                                "`lakelens submit -- annotate s3://bucket/lake --out s3://bucket/out`")
        if self.args[0] not in SUBMITTABLE:
            raise LakelensError(f"submit: {self.args[0]!r} is not a command a job runs; choose from "
                                f"{', '.join(SUBMITTABLE)}")
        for flag, value in zip(self.args, self.args[1:], strict=False):
            if flag in PATH_FLAGS and "://" not in value and not os.path.isabs(os.path.expanduser(value)):
                raise LakelensError(
                    f"submit: {flag} {value!r} is relative: on the cluster it would land in the job's "
                    "temporary working_dir. Give an absolute path on storage the cluster sees, or a URI")


def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else an http(s) RAY_ADDRESS, else 127.0.0.1:8265."""
    if address:
        return address
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(var, "")
        if value.startswith(("http://", "https://")):
            return value
    return DEFAULT_ADDRESS


def check_address(address: str, *, allow_insecure_http: bool = False) -> str:
    """The Jobs API URL, or a one-line error: http(s) only, no plain http off this machine."""
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LakelensError(f"--address {address!r}: the Jobs API is an http(s) URL such as "
                            f"{DEFAULT_ADDRESS} (after `ray dashboard cluster.yaml`) or "
                            "https://ray.example.com")
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not allow_insecure_http:
        raise LakelensError(
            f"refusing plain http:// to {parts.hostname}: the Ray token would cross the network "
            f"in clear. Port-forward with `ray dashboard cluster.yaml` and use {DEFAULT_ADDRESS}, "
            "put an https proxy in front, or pass --allow-insecure-http")
    return address.rstrip("/")


def use_token_if_present() -> None:
    """Send Ray's token with every request when one exists (the Jobs SDK adds the header
    only when RAY_AUTH_MODE=token in the client's environment)."""
    if AUTH_MODE_ENV in os.environ:
        return  # the user chose; Ray read it at import
    path = token_path()
    if os.environ.get(TOKEN_ENV) or (path is not None and path.is_file()):
        from ray._raylet import Config

        os.environ[AUTH_MODE_ENV] = "token"
        Config.initialize("")
    if path is not None and path.is_file():
        secure_file(path)


def project_dir() -> Path | None:
    """The lakelens source tree this code runs from (None when lakelens is installed as a
    package: then the cluster's installed lakelens runs the job)."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "lakelens"' in pyproject.read_text():
        return root
    return None


def package_files(working_dir: Path, excludes: tuple[str, ...] = EXCLUDES) -> list[tuple[int, str]]:
    """(size, relative path) of every file Ray would upload, walked with Ray's own rules
    (its default excludes, ours, .gitignore and .rayignore)."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    patterns = list(ray_constants.get_runtime_env_default_excludes()) + list(excludes)
    files: list[tuple[int, str]] = []

    def visit(path: Path) -> None:
        if path.is_file():
            files.append((path.stat().st_size, str(path.relative_to(working_dir))))

    quiet = logging.getLogger(f"{__name__}.package")  # Ray logs each ignore file it honours
    quiet.setLevel(logging.WARNING)
    _dir_travel(working_dir, [_get_excludes(working_dir, patterns)], visit,
                include_gitignore=include_gitignore, logger=quiet)
    return files


def check_package(working_dir: Path) -> int:
    """Total bytes of the upload; a one-line error naming what made it large when over the limit."""
    files = package_files(working_dir)
    total = sum(size for size, _ in files)
    if total > MAX_PACKAGE_BYTES:
        by_top: dict[str, int] = {}
        for size, rel in files:
            top = rel.split(os.sep, 1)[0]
            by_top[top] = by_top.get(top, 0) + size
        largest = sorted(by_top.items(), key=lambda kv: -kv[1])[:3]
        named = ", ".join(f"{name} ({size / 2**20:.0f} MiB)" for name, size in largest)
        raise LakelensError(
            f"the job package from {working_dir} is {total / 2**20:.0f} MiB, over the Jobs API's "
            f"{MAX_PACKAGE_BYTES // 2**20} MiB: largest {named}. Add them to .rayignore or move them out")
    return total


def client(address: str) -> JobSubmissionClient:
    """A Jobs API client, with a one-line error when the address does not answer."""
    from ray.job_submission import JobSubmissionClient

    use_token_if_present()
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise LakelensError(f"cannot reach the Ray Jobs API at {address}: {_first_line(e)}") from e


def entrypoint(args: tuple[str, ...], *, in_working_dir: bool) -> str:
    """What the job runs: the uploaded source's CLI, else the cluster's installed one."""
    command = ["python", "-m", "pipelines.cli"] if in_working_dir else ["lakelens"]
    return shlex.join([*command, *args])


def submit(cfg: SubmitConfig) -> int:
    """Submit; with `wait`, stream the logs and return the exit status the job's state says."""
    address = check_address(cfg.address, allow_insecure_http=cfg.allow_insecure_http)
    working_dir = Path(cfg.working_dir).resolve() if cfg.working_dir else project_dir()
    runtime_env: dict = {}
    if working_dir is not None:
        if not working_dir.is_dir():
            raise LakelensError(f"--working-dir {working_dir}: not a directory")
        size = check_package(working_dir)
        logger.info("uploading %s (%.1f MiB) as the job's working_dir", working_dir, size / 2**20)
        runtime_env = {"working_dir": str(working_dir), "excludes": list(EXCLUDES)}
    jobs = client(address)
    logging.getLogger("ray._private.runtime_env").setLevel(logging.ERROR)  # we checked the package
    try:
        job_id = jobs.submit_job(
            entrypoint=entrypoint(cfg.args, in_working_dir=working_dir is not None),
            runtime_env=runtime_env or None, submission_id=cfg.submission_id,
            metadata={"submitted_by": "lakelens", "command": cfg.args[0]})
    except (RuntimeError, ValueError) as e:
        raise LakelensError(f"the Jobs API at {address} refused the job: {_first_line(e)}") from e
    print(f"submitted job {job_id} to {address}", flush=True)
    if not cfg.wait:
        print(f"follow it with: lakelens jobs logs {job_id} --follow --address {address}")
        return 0
    return follow(jobs, job_id)


def follow(jobs: JobSubmissionClient, job_id: str, *, poll_s: float = 1.0) -> int:
    """Stream a job's logs until it ends, then print whatever the stream dropped; the exit
    status follows the final state (SUCCEEDED 0, FAILED 1, STOPPED 130)."""
    printed = 0

    async def stream() -> None:
        nonlocal printed
        async for chunk in jobs.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            printed += len(chunk)

    try:
        asyncio.run(stream())
    except Exception as e:  # noqa: BLE001 - the stream is known to drop; the final fetch below covers it
        logger.debug("log stream ended: %s", e)
    status = wait_terminal(jobs, job_id, poll_s=poll_s)
    logs = jobs.get_job_logs(job_id)
    if len(logs) > printed:  # the stream's last lines (it is known to drop them)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
    message = _reason(jobs.get_job_info(job_id).message) if status != "SUCCEEDED" else ""
    print(f"job {job_id}: {status}" + (f" ({message})" if message else ""), flush=True)
    return {"SUCCEEDED": 0, "STOPPED": 130}.get(status, 1)


def wait_terminal(jobs: JobSubmissionClient, job_id: str, *, poll_s: float = 1.0,
                  timeout_s: float | None = None) -> str:
    start = time.monotonic()
    while True:
        status = str(jobs.get_job_status(job_id))
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            return status
        time.sleep(poll_s)


def _reason(message: str | None) -> str:
    """A job's status message without the copy of its logs Ray appends to it."""
    lines = (message or "").split(", last available logs", 1)[0].strip().splitlines()
    return lines[0] if lines else ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _known(jobs: JobSubmissionClient, job_id: str, address: str) -> None:
    try:
        jobs.get_job_info(job_id)
    except RuntimeError as e:
        raise LakelensError(f"no job {job_id!r} at {address} (see `lakelens jobs list`)") from e


def jobs_command(action: str, job_id: str | None, *, address: str, follow_logs: bool = False,
                 allow_insecure_http: bool = False) -> int:
    """`lakelens jobs list|status|logs|stop`."""
    address = check_address(address, allow_insecure_http=allow_insecure_http)
    jobs = client(address)
    if action == "list":
        rows = sorted(jobs.list_jobs(), key=lambda j: j.start_time or 0)
        print(f"{'JOB':<28} {'STATUS':<10} {'STARTED':<20} ENTRYPOINT")
        for j in rows:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
            print(f"{(j.submission_id or j.job_id or '-'):<28} {str(j.status):<10} {started:<20} "
                  f"{j.entrypoint[:80]}")
        return 0
    if not job_id:
        raise LakelensError(f"jobs {action}: name the job (see `lakelens jobs list`)")
    _known(jobs, job_id, address)
    if action == "status":
        info = jobs.get_job_info(job_id)
        reason = _reason(info.message)
        print(f"{job_id}: {info.status}" + (f" ({reason})" if reason else ""))
        return 0
    if action == "logs":
        if follow_logs:
            return follow(jobs, job_id)
        sys.stdout.write(jobs.get_job_logs(job_id))
        return 0
    if action == "stop":
        jobs.stop_job(job_id)
        status = wait_terminal(jobs, job_id, timeout_s=60)
        print(f"{job_id}: {status}")
        return 0 if status in TERMINAL else 1
    raise LakelensError(f"jobs {action!r}: choose from list, status, logs, stop")
