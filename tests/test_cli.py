"""The `lakelens` command: user mistakes are one line and a non-zero exit; a real run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import read_results

TINY = ["--tasks", "embed", "--arch", "embed=tiny", "--weights", "random"]


def lakelens(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)  # token auth on: conftest gives the run its own token
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    (tmp_path / "lake").mkdir()
    for i in range(3):
        Image.new("RGB", (48, 32), (i * 60, 100, 50)).save(tmp_path / "lake" / f"{i}.jpg")
    return tmp_path / "lake"


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|DEBUG) ")  # progress
# Ray's own C++ log lines (e.g. core_worker.cc's notice about actor constructor arguments,
# printed for every Ray Data actor pool in Ray 2.60): Ray's, not lakelens's error output.
RAY_CC_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [IWE] \d+ \d+\] \w+\.cc:\d+: ")


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not LOG_LINE.match(line) and not RAY_CC_LINE.match(line)]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and needle in lines[0], lines[0]


@pytest.mark.parametrize(("args", "needle"), [
    (["annotate", "/no/such/dir", "--out", "{tmp}/o"], "does not exist"),
    (["annotate", "{lake}", "--out", "{tmp}/o", "--tasks", "detect,colorize"],
     "unknown task 'colorize'"),
    (["annotate", "{lake}", "--out", "{tmp}/o", "--weights", "/no/such.pt"], "'random'"),
    (["annotate", "{lake}", "--out", "{tmp}/o", "--weights", "segment=/no/such.pt"],
     "--weights segment"),
    (["annotate", "{lake}", "--out", "{tmp}/o", "--arch", "detect=yolo"], "unknown detect arch"),
    (["annotate", "{lake}", "--out", "{tmp}/o", "--arch", "detect"], "TASK=VALUE"),
    (["annotate", "{lake}", "--out", "/proc/lakelens-out", *TINY], "not writable"),
    (["annotate", "{lake}", "--out", "{tmp}/o", "--batch-size", "0"], "--batch-size"),
    (["annotate", "{lake}", "--out", "{tmp}/o", "--image-size", "abc"], "invalid int"),
    (["annotate", "{lake}"], "--out"),
    (["annotate", "{tmp}/empty", "--out", "{tmp}/o", *TINY], "no images found"),
    (["annotate", "{lake}", "--out", "{tmp}/o", "--tasks", "detect",
      "--arch", "detect=fasterrcnn_tiny", "--weights", "detect=default"],
     "no published weights"),
])
def test_user_mistakes_are_one_line(args: list[str], needle: str, lake: Path,
                                    tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    argv = [a.format(lake=lake, tmp=tmp_path) for a in args]
    _one_line_error(lakelens(*argv), needle)


def test_loose_results_of_an_older_lakelens_are_refused(lake: Path, tmp_path: Path) -> None:
    (tmp_path / "o" / "results").mkdir(parents=True)
    (tmp_path / "o" / "results" / "part-x.parquet").write_bytes(b"PAR1")
    _one_line_error(lakelens("annotate", str(lake), "--out", str(tmp_path / "o"), *TINY),
                    "older lakelens")
    _one_line_error(lakelens("results", str(tmp_path / "o")), "holds no lakelens table")
    _one_line_error(lakelens("index", "build", str(tmp_path / "o"), "--out", str(tmp_path / "i")),
                    "holds no lakelens table")


@pytest.mark.slow  # two full CLI runs with Ray start: ~26 s; `make test-all` runs it
def test_annotate_and_synth_commands_run(tmp_path: Path) -> None:
    synth = lakelens("synth", str(tmp_path / "s"), "--images", "8", "--family-size", "2",
                     "--seed", "1", "--size", "64")
    assert synth.returncode == 0, synth.stderr
    assert len(list((tmp_path / "s" / "train" / "images").glob("*.jpg"))) == 6
    assert len(list((tmp_path / "s" / "val" / "images").glob("*.jpg"))) == 2
    proc = lakelens("annotate", str(tmp_path / "s" / "train"), "--out", str(tmp_path / "o"),
                    "--weights", "random", "--arch", "detect=fasterrcnn_tiny",
                    "--arch", "segment=maskrcnn_tiny", "--arch", "pose=keypointrcnn_tiny",
                    "--arch", "embed=tiny", "--num-cpus", "2", "--limit", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 images listed (6 new, 0 changed" in proc.stdout, proc.stdout
    assert "2 annotated, 0 errors" in proc.stdout and "Skipped non-image files: 1 .json" in proc.stdout
    assert read_results(tmp_path / "o").num_rows == 2


def test_help_lists_the_arch_choices() -> None:
    proc = lakelens("annotate", "--help")
    assert proc.returncode == 0
    assert "fasterrcnn_mobilenet_v3_large_fpn" in proc.stdout and "keypointrcnn_tiny" in proc.stdout
