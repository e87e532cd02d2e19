"""The job package `lakelens submit` uploads: which files, a credential scan, one zip.

What goes up. Without --working-dir, only what `python -m pipelines.cli ...` needs: the
project's own packages and config (`INCLUDE`: pipelines/, models/, index/,
pyproject.toml, cluster.yaml), so a notes/ folder, a key dropped at the top level or a
test fixture never leaves the laptop. With --working-dir DIR, all of DIR. Either way the
deny-list `EXCLUDES` (venvs, .git, caches, outputs, weights and the obvious secret names),
.gitignore and .rayignore apply, with Ray's own rules (`raycompat.package_walk`).

How it goes up. Ray's runtime_env `working_dir` has no include option, and computing
excludes that leave exactly an include-list is fragile (gitignore negations, nested
ignore files). Ray does take a local .zip as `working_dir` and uploads its bytes as they
are (no excludes applied, unpacked as is on the cluster). So lakelens lists the files,
scans each one, and writes the zip itself, in a private temporary directory (0700):
what was scanned is what is uploaded, byte for byte (each file is opened once, its head
scanned, then the whole of it copied into the zip). The zip is deterministic (sorted
names, fixed timestamps), so an unchanged project has the same content hash and Ray
uploads it only once.

The scan. Every file that would go up is checked by name (.netrc, .git-credentials,
kubeconfig, SSH key names ...) and by content: private key headers, cloud
service-account JSON, AWS access key ids and secret keys, PyPI/npm/GitHub tokens,
.pypirc/.npmrc passwords, netrc entries, kubeconfigs with users or keys, git credential
URLs, docker `auths`. Bounded: at most the first `HEAD_BYTES` (64 KiB) of a file are
read for the scan, and files whose head holds a NUL byte (binary) are not searched, so
the scan costs O(files x 64 KiB) whatever the sizes. Any hit refuses the whole upload
with one line naming the first few files, their count and why; `--allow-file PATH`
(relative to the working dir) lets a named file go, or remove it or list it in .rayignore.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shutil
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from models.errors import LakelensError
from pipelines.cluster import raycompat

logger = logging.getLogger(__name__)

INCLUDE = ("pipelines", "models", "index", "pyproject.toml", "cluster.yaml")
MAX_PACKAGE_BYTES = 100 * 1024 * 1024  # the Jobs API refuses larger uploads
HEAD_BYTES = 64 * 1024  # what the credential scan reads of each file
NAMED_IN_ERROR = 3
# gitignore syntax, on top of .gitignore (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and .rayignore
EXCLUDES = (
    ".git", ".venv", "venv", ".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx",
    "*credentials*", "*secret*", ".aws", ".ssh", ".netrc", "id_rsa*", "auth_token",
    "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", ".mypy_cache", "*.egg-info",
    "demo-out", "out", "outputs", "benchmarks/results", "*.ckpt", "*.pt", "*.pth", "*.safetensors",
    "_delta_log", "node_modules",
)

# (glob on the file name or on the path's tail, why): credentials by name alone
CREDENTIAL_NAMES = (
    (".netrc", "a netrc file (login passwords)"),
    ("_netrc", "a netrc file (login passwords)"),
    (".git-credentials", "git credentials"),
    ("kubeconfig", "a kubeconfig"), ("kubeconfig.y*ml", "a kubeconfig"), ("*.kubeconfig", "a kubeconfig"),
    (".kube/config", "a kubeconfig"),
    ("id_rsa", "an SSH private key"), ("id_dsa", "an SSH private key"),
    ("id_ecdsa", "an SSH private key"), ("id_ed25519", "an SSH private key"),
    ("id_ecdsa_sk", "an SSH private key"), ("id_ed25519_sk", "an SSH private key"),
    (".htpasswd", "a password file"),
)


def _re(pattern: str) -> re.Pattern[bytes]:
    return re.compile(pattern.encode(), re.MULTILINE)


@dataclass(frozen=True)
class Rule:
    """A credential by content: `pattern` and every one of `also` match a file's head. The
    regexes run only when one of the literal `triggers` occurs in it (a bytes search is
    ~20x cheaper than a regex over 64 KiB)."""

    why: str
    triggers: tuple[bytes, ...]
    pattern: re.Pattern[bytes]
    also: tuple[re.Pattern[bytes], ...] = ()


# The head is searched as b"\n" + head + b"\n", so "\n" marks a line's start or end: a pattern
# that starts with a literal lets `re` jump to its candidates instead of trying every position.
CREDENTIAL_CONTENT = (  # first hit wins
    Rule("a cloud service-account key", (b"service_account",), _re(r'"type"\s*:\s*"service_account"')),
    Rule("a cloud service-account key", (b'"private_key"',), _re(r'"private_key"\s*:\s*"')),
    Rule("a private key", (b"PRIVATE KEY",), _re(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")),
    Rule("a private key", (b"PuTTY-User-Key-File-",), _re(r"\nPuTTY-User-Key-File-\d+:")),
    Rule("an AWS secret access key",
         (b"ecret_access_key", b"ECRET_ACCESS_KEY", b"ecretAccessKey", b"ecret-access-key"),
         _re(r"(?i)secret_?access_?key[\"']?\s*[=:]\s*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])")),
    Rule("an AWS access key id", (b"AKIA", b"ASIA"),
         _re(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")),
    Rule("a PyPI token", (b"pypi-AgE",), _re(r"pypi-AgE[A-Za-z0-9_-]{20,}")),
    Rule("a GitHub token", (b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_", b"github_pat_"),
         _re(r"(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{40,})(?![A-Za-z0-9_])")),
    Rule("an npm auth token", (b":_auth", b":_password"), _re(r":_(?:authToken|auth|password)\s*=\s*\S")),
    Rule("an npm auth token", (b"npm_",), _re(r"npm_[A-Za-z0-9]{36}(?![A-Za-z0-9_])")),
    Rule("a .pypirc password", (b"[pypi]", b"[distutils]", b"[testpypi]"),
         _re(r"\n\[(?:distutils|pypi|testpypi)\]"), (_re(r"\n[ \t]*password[ \t]*[:=][ \t]*\S"),)),
    Rule("a netrc entry (login password)", (b"machine",),
         _re(r"machine[ \t\n]+[\w.:-]+\s+(?:login|account|password)\s[\s\S]{0,300}?"
             r"\bpassword[ \t\n]+[^\s=:]")),
    Rule("a netrc entry (login password)", (b"default",),
         _re(r"\ndefault\s+(?:login|account|password)\s[\s\S]{0,300}?\bpassword[ \t\n]+[^\s=:]")),
    Rule("a kubeconfig with credentials", (b"client-key-data",), _re(r"client-key-data\s*:\s*\S")),
    Rule("a kubeconfig with credentials", (b"clusters",), _re(r"\nclusters\s*:"), (_re(r"\nusers\s*:"),)),
    Rule("a kubeconfig with credentials", (b"Config",), _re(r"\nkind[ \t]*:[ \t]*Config[ \t]*\r?\n"),
         (_re(r"\n[ \t]*(?:token|password)[ \t]*:[ \t]*\S"),)),
    Rule("a URL with a password in it (git credentials)", (b"://",),
         _re(r"https?://[^\s:/@\"'<>$]+:[^\s@/\"'<>${}]+@[\w-]+\.[\w.-]+")),
    Rule("a docker registry login", (b'"auths"',), _re(r'"auths"\s*:\s*\{'),
         (_re(r'"(?:auth|identitytoken|password)"\s*:\s*"[^"]{4,}'),)),
)


NPMRC_AUTH = _re(r"\n[ \t]*_(?:authToken|auth|password)[ \t]*=[ \t]*\S")  # in a file named *npmrc only


@dataclass(frozen=True)
class Package:
    """A built job package: the zip at `path`, made of `files` (relative POSIX paths,
    sorted) from `root`, `nbytes` before compression."""

    root: Path
    path: Path
    files: tuple[str, ...]
    nbytes: int


def package_files(working_dir: Path, excludes: Sequence[str] = EXCLUDES, *,
                  include: Sequence[str] | None = None) -> list[tuple[int, str]]:
    """(size, relative path) of every file that goes up from `working_dir`: under the
    top-level names in `include` only (None: all), and not excluded by `excludes`,
    .gitignore or .rayignore (Ray's rules). Sorted by path."""
    root = working_dir.resolve()
    keep = set(include) if include is not None else None

    def outside(path: Path) -> bool:
        parts = path.relative_to(root).parts
        return keep is not None and bool(parts) and parts[0] not in keep

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    found = raycompat.package_walk(root, excludes, skip=outside, include_gitignore=include_gitignore)
    files = [(p.stat().st_size, p.relative_to(root).as_posix()) for p in found]
    return sorted(files, key=lambda f: f[1])


def check_package(working_dir: Path, files: list[tuple[int, str]] | None = None) -> int:
    """Total bytes of the upload; a one-line error naming what made it large when over the limit."""
    files = package_files(working_dir) if files is None else files
    total = sum(size for size, _ in files)
    if total > MAX_PACKAGE_BYTES:
        by_top: dict[str, int] = {}
        for size, rel in files:
            top = rel.split("/", 1)[0]
            by_top[top] = by_top.get(top, 0) + size
        largest = sorted(by_top.items(), key=lambda kv: -kv[1])[:3]
        named = ", ".join(f"{name} ({size / 2**20:.0f} MiB)" for name, size in largest)
        raise LakelensError(
            f"the job package from {working_dir} is {total / 2**20:.0f} MiB, over the Jobs API's "
            f"{MAX_PACKAGE_BYTES // 2**20} MiB: largest {named}. Add them to .rayignore or move them out")
    return total


def credential_reason(rel: str, head: bytes) -> str | None:
    """Why the file at relative POSIX path `rel`, whose first bytes are `head`, looks like a
    credential (None when it does not). Binary heads are judged by name only."""
    path = PurePosixPath(rel)
    for pattern, why in CREDENTIAL_NAMES:
        if "/" in pattern:
            if rel == pattern or rel.endswith("/" + pattern):
                return why
        elif fnmatch.fnmatchcase(path.name, pattern):
            return why
    if b"\x00" in head:
        return None
    text = b"\n" + head + b"\n"
    if path.name.endswith("npmrc") and NPMRC_AUTH.search(text):
        return "an npm auth token"
    for rule in CREDENTIAL_CONTENT:
        if (any(t in text for t in rule.triggers) and rule.pattern.search(text)
                and all(p.search(text) for p in rule.also)):
            return rule.why
    return None


def _allowed(root: Path, allow_files: Sequence[str], listed: set[str]) -> set[str]:
    allowed: set[str] = set()
    for given in allow_files:
        path = Path(given).expanduser()
        try:
            rel = (path.resolve().relative_to(root) if path.is_absolute()
                   else PurePosixPath(os.path.normpath(given)))
        except ValueError:
            raise LakelensError(f"--allow-file {given}: not inside the working dir {root}") from None
        rel_str = PurePosixPath(*Path(rel).parts).as_posix()
        if rel_str not in listed:
            raise LakelensError(f"--allow-file {given}: no such file in the job package from {root} "
                                "(give a path relative to the working dir, one that is not excluded)")
        allowed.add(rel_str)
    return allowed


def build_package(working_dir: Path, dest_dir: Path, *, include: Sequence[str] | None = None,
                  allow_files: Sequence[str] = ()) -> Package:
    """List, check (size, credentials) and zip the files that go up from `working_dir`
    into `dest_dir/job.zip` (dest_dir is made 0700 when missing).

    Raises LakelensError (one line) when the package is over the Jobs API's limit, when an
    --allow-file names no file of the package, or when a file not in `allow_files` looks
    like a credential; then no zip is left behind.
    """
    root = working_dir.resolve()
    files = package_files(root, include=include)
    nbytes = check_package(root, files)
    allowed = _allowed(root, allow_files, {rel for _, rel in files})
    dest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = dest_dir / "job.zip"
    findings: list[tuple[str, str]] = []
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for _, rel in files:
            with open(root / rel, "rb") as src:
                head = src.read(HEAD_BYTES)
                why = None if rel in allowed else credential_reason(rel, head)
                if why is not None:
                    findings.append((rel, why))
                if findings:
                    continue  # keep scanning to name them all; the zip is going away
                info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = (stat.S_IFREG | (os.fstat(src.fileno()).st_mode & 0o777)) << 16
                with zf.open(info, "w") as dst:
                    dst.write(head)
                    shutil.copyfileobj(src, dst, 1 << 20)
    if findings:
        target.unlink()
        raise LakelensError(_refusal(root, findings))
    logger.debug("job package %s: %d files, %d bytes", target, len(files), nbytes)
    return Package(root=root, path=target, files=tuple(rel for _, rel in files), nbytes=nbytes)


def _refusal(root: Path, findings: list[tuple[str, str]]) -> str:
    named = ", ".join(f"{rel} ({why})" for rel, why in findings[:NAMED_IN_ERROR])
    more = f" and {len(findings) - NAMED_IN_ERROR} more" if len(findings) > NAMED_IN_ERROR else ""
    many = len(findings) > 1
    them = "them" if many else "it"
    return (f"refusing to upload {len(findings)} credential-shaped file{'s' if many else ''} from {root}: "
            f"{named}{more}. Remove {them} or list {them} in {root / '.rayignore'}, or pass "
            f"--allow-file PATH (relative to {root}) for each file that must go")
