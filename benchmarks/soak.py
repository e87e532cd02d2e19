"""Thirty nights of faults (tests/soak.py): `python benchmarks/soak.py --nights 30 --seed 0`.

Builds a lake of ~2,000 small images, then for each night changes it, injects one fault
drawn from tests.soak.FAULTS, runs the nightly commands as a scheduler would (a failed
command is run once more), and checks every invariant from the outside while
`lakelens serve` answers queries. Prints one JSON object as its last line: nights, faults
by kind, runs, invariant violations (with examples), service requests and failures, wall
time. `--quick`: 100 images, 3 nights (CI sizes).

As root, the soak re-runs itself without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (setpriv),
so that a directory made unreadable (chmod 000) is unreadable to the runs too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DROP = "-dac_override,-dac_read_search"


def _has_dac_override() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & 0b110)  # CAP_DAC_OVERRIDE (1), CAP_DAC_READ_SEARCH (2)
    return False


def _can_drop() -> bool:
    """Whether setpriv exists and may drop capabilities here (a container may forbid it;
    then the soak runs as it is, and its unreadable-directory nights are skipped)."""
    import subprocess

    if not shutil.which("setpriv"):
        return False
    probe = subprocess.run(["setpriv", "--bounding-set", DROP, "--inh-caps", DROP, "true"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nights", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="100 images, 3 nights")
    p.add_argument("--work", help="working directory (default: a new temporary one, removed after)")
    p.add_argument("--out", help="also write the JSON result to this file")
    args = p.parse_args(argv)
    if os.geteuid() == 0 and _has_dac_override() and _can_drop():
        # exec, not a child: signals (a test's timeout, Ctrl-C) reach the soak itself
        os.execvp("setpriv", ["setpriv", "--bounding-set", DROP, "--inh-caps", DROP, sys.executable,
                              *sys.argv])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleanup runs: cluster, S3, service
    if args.quick:
        args.images, args.nights = min(args.images, 100), min(args.nights, 3)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if "RAY_AUTH_TOKEN_PATH" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ:
        token_dir = tempfile.mkdtemp(prefix="soak-token-")  # this run's own Ray token
        path = os.path.join(token_dir, "auth_token")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=path)
    from tests.soak import SoakConfig, clear, run_soak

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run_soak(SoakConfig(work=work, nights=args.nights, seed=args.seed, images=args.images,
                                     five_images=min(60, max(10, args.images // 30))))
    finally:
        if not args.work:
            clear(work)
    result["quick"] = bool(args.quick)
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0 if result["violations"] == 0 and not result["stopped"] else 1


if __name__ == "__main__":
    sys.exit(main())
