"""`lakelens submit` and `lakelens jobs`: lakelens commands as Ray jobs (the Jobs API).

The job runs `python -m pipelines.cli ARGS` in an uploaded working_dir, the same command a
laptop runs, so the cluster runs the code the laptop has. What goes up is decided in
`pipelines.cluster.package`: by default an include-list of the project's own code
(pipelines/, models/, index/, pyproject.toml, cluster.yaml), or all of --working-dir;
every file is scanned for credentials (by name and by the first 64 KiB of content) and
the upload is refused, in one line, unless each hit is named with --allow-file; the files
are zipped by lakelens and the zip is the working_dir, so what was scanned is what goes up.

Right after `ray start --head` the dashboard refuses connections for a few seconds and
then answers "No available agent to submit job" until the head's job agent registers:
submit waits for both, with bounded backoff (`SubmitConfig.agent_wait_s`, 60 s), saying
so once on stderr, and gives up with one line.

The Jobs API is reached over HTTP(S): through `ray dashboard cluster.yaml` (a
port-forward to 127.0.0.1:8265) or an authenticated HTTPS proxy; plain `http://` to
another host is refused unless the user says `--allow-insecure-http`, since the Ray token
travels in a header. The token is read from where Ray reads it (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and only put in that header: never on a command
line, in a log or in the job's metadata.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from models.errors import LakelensError
from pipelines.cluster.local import AUTH_MODE_ENV, TOKEN_ENV, secure_file, token_path
from pipelines.cluster.net import is_loopback
from pipelines.cluster.package import (  # noqa: F401 - check_package, package_files: the old home
    EXCLUDES,
    INCLUDE,
    MAX_PACKAGE_BYTES,
    build_package,
    check_package,
    package_files,
)

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # `ray dashboard cluster.yaml` forwards here
AGENT_WAIT_S = 60.0  # how long submit waits for the dashboard and the head's job agent
SUBMITTABLE = ("annotate", "results", "index", "query", "eval", "export", "render", "synth", "train")
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
    allow_files: tuple[str, ...] = ()    # credential-shaped files that may go up (relative paths)
    agent_wait_s: float = AGENT_WAIT_S   # wait this long for the Jobs API and its agent

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


def auth_headers() -> dict[str, str]:
    """The Authorization header for Ray's token when one exists and the user did not set
    RAY_AUTH_MODE (then Ray's SDK adds it, or not, as told). The token file, when it is
    ours and readable by others, is narrowed to 0600 first."""
    if AUTH_MODE_ENV in os.environ:
        return {}
    token = os.environ.get(TOKEN_ENV, "").strip()
    path = token_path()
    if not token and path is not None and path.is_file():
        secure_file(path)
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def project_dir() -> Path | None:
    """The lakelens source tree this code runs from (None when lakelens is installed as a
    package: then the cluster's installed lakelens runs the job)."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "lakelens"' in pyproject.read_text():
        return root
    return None


def _connect(address: str) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return JobSubmissionClient(address, headers=auth_headers())


def client(address: str) -> JobSubmissionClient:
    """A Jobs API client, with a one-line error when the address does not answer."""
    from ray.exceptions import AuthenticationError

    try:
        return _connect(address)
    except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as e:
        raise LakelensError(f"cannot reach the Ray Jobs API at {address}: {_first_line(e)}") from e


T = TypeVar("T")


def _no_agent(e: BaseException) -> bool:
    return "No available agent" in str(e)


def _transient(e: BaseException) -> bool:
    """The errors of a head that is still starting: its dashboard refusing connections,
    or answering that the job agent has not registered yet."""
    if _no_agent(e):
        return True
    chain: BaseException | None = e
    while chain is not None:
        if isinstance(chain, ConnectionRefusedError) or "Connection refused" in str(chain):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


@dataclass
class AgentWait:
    """One time budget for connecting to the Jobs API and handing it the job; transient
    errors (see `_transient`) are retried with backoff (0.5 s doubling to 5 s), anything
    else is raised at once. The wait is announced once on stderr."""

    address: str
    budget_s: float = AGENT_WAIT_S
    start: float = field(default_factory=time.monotonic)
    announced: bool = False

    def run(self, attempt: Callable[[], T]) -> T:
        import requests

        delay = 0.5
        while True:
            try:
                return attempt()
            except (ConnectionError, RuntimeError, requests.exceptions.ConnectionError) as e:
                if not _transient(e):
                    raise
                left = self.budget_s - (time.monotonic() - self.start)
                if left <= 0:
                    hint = ("is the cluster up (`ray status` on the head)?" if not _no_agent(e) else
                            "the head's job agent did not register: see dashboard_agent.log in the "
                            "head's session logs (its port, 52365 by default, may be taken)")
                    what = "no Ray job agent answered" if _no_agent(e) else "cannot reach the Ray Jobs API"
                    raise LakelensError(f"{what} at {self.address} after {self.budget_s:.3g} s of "
                                        f"waiting ({_first_line(e)}); {hint}") from e
            if not self.announced:
                print(f"waiting for the Ray job agent at {self.address}…", file=sys.stderr, flush=True)
                self.announced = True
            time.sleep(min(delay, max(left, 0.05)))
            delay = min(delay * 2, 5.0)


def connect_when_ready(address: str, *, budget_s: float = AGENT_WAIT_S,
                       wait: AgentWait | None = None) -> JobSubmissionClient:
    """A Jobs API client, waiting up to `budget_s` (or `wait`'s budget) for the dashboard;
    a one-line error when it does not come, or answers with anything but "not yet"."""
    from ray.exceptions import AuthenticationError

    wait = wait or AgentWait(address, budget_s)
    try:
        return wait.run(lambda: _connect(address))
    except (ConnectionError, RuntimeError, ValueError, AuthenticationError) as e:
        raise LakelensError(f"cannot reach the Ray Jobs API at {address}: {_first_line(e)}") from e


def entrypoint(args: tuple[str, ...], *, in_working_dir: bool) -> str:
    """What the job runs: the uploaded source's CLI, else the cluster's installed one."""
    command = ["python", "-m", "pipelines.cli"] if in_working_dir else ["lakelens"]
    return shlex.join([*command, *args])


def submit(cfg: SubmitConfig) -> int:
    """Submit; with `wait`, stream the logs and return the exit status the job's state says."""
    address = check_address(cfg.address, allow_insecure_http=cfg.allow_insecure_http)
    working_dir = Path(cfg.working_dir).resolve() if cfg.working_dir else project_dir()
    if working_dir is None and cfg.allow_files:
        raise LakelensError("--allow-file: nothing is uploaded (lakelens runs from an installed "
                            "package); pass --working-dir DIR")
    if working_dir is not None and not working_dir.is_dir():
        raise LakelensError(f"--working-dir {working_dir}: not a directory")
    staging = Path(tempfile.mkdtemp(prefix="lakelens-job-"))  # 0700
    try:
        runtime_env: dict = {}
        if working_dir is not None:
            pkg = build_package(working_dir, staging, include=None if cfg.working_dir else INCLUDE,
                                allow_files=cfg.allow_files)
            logger.info("uploading %d files from %s (%.1f MiB) as the job's working_dir",
                        len(pkg.files), working_dir, pkg.nbytes / 2**20)
            runtime_env = {"working_dir": str(pkg.path)}
        wait = AgentWait(address, cfg.agent_wait_s)
        jobs = connect_when_ready(address, wait=wait)
        try:
            job_id = wait.run(lambda: jobs.submit_job(
                entrypoint=entrypoint(cfg.args, in_working_dir=working_dir is not None),
                runtime_env=runtime_env or None, submission_id=cfg.submission_id,
                metadata={"submitted_by": "lakelens", "command": cfg.args[0]}))
        except (RuntimeError, ValueError) as e:
            raise LakelensError(f"the Jobs API at {address} refused the job: {_first_line(e)}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
