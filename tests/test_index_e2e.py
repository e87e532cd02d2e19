"""annotate --tasks embed -> index build -> query: each image finds itself first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from index.store import open_index
from pipelines.annotate import run
from pipelines.config import AnnotateConfig
from pipelines.indexing import IndexBuildConfig, build
from pipelines.synth import write_lake
from tests.test_cli import _one_line_error, lakelens


@pytest.fixture(scope="module")
def indexed(ray_local, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("e2e")
    write_lake(root / "lake", images=12, seed=5)
    (root / "lake" / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    summary = run(AnnotateConfig(sources=(str(root / "lake"),), out=str(root / "out"),
                                 tasks=("embed",), weights={"embed": "random"},
                                 archs={"embed": "tiny"}, batch_size=4))
    assert (summary.annotated, summary.errors) == (12, 1)
    build(IndexBuildConfig(results=str(root / "out"), out=str(root / "index")))
    return root / "lake" / "images", root / "index"


def test_every_image_retrieves_itself_first(indexed: tuple[Path, Path]) -> None:
    images, index_dir = indexed
    idx = open_index(index_dir)
    paths = sorted(str(p) for p in images.glob("0*.jpg"))
    found = idx.search_images(paths, 3)
    assert [uris[0] for uris in found.uris] == paths
    assert all(abs(float(s[0]) - 1.0) < 1e-3 for s in found.scores)  # cosine of itself
    first = idx.live_image_ids()[0]
    by_id = idx.search_ids([first], 2)
    assert by_id.image_ids[0][0] == first


def test_query_command_json_and_text(indexed: tuple[Path, Path], tmp_path: Path) -> None:
    images, index_dir = indexed
    proc = lakelens("query", str(index_dir), "--image", str(images / "000003.jpg"), "-k", "4",
                    "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out) == 1 and len(out[0]) == 4
    assert out[0][0]["uri"] == str(images / "000003.jpg") and out[0][0]["rank"] == 1
    assert set(out[0][0]) == {"rank", "score", "image_id", "uri"}
    idx = open_index(index_dir)
    np.save(tmp_path / "q.npy", np.stack([np.ones(idx.dim, np.float32)] * 2))
    proc = lakelens("query", str(index_dir), "--vector", str(tmp_path / "q.npy"), "-k", "2")
    assert proc.returncode == 0 and proc.stdout.count("query ") == 2, proc.stderr[-2000:]
    (tmp_path / "queries").mkdir()
    for name in ("000001.jpg", "000002.jpg", "000007.jpg"):
        shutil.copy(images / name, tmp_path / "queries" / name)
    batch = lakelens("query", str(index_dir), "--image", str(tmp_path / "queries"), "--json",
                     "-k", "1")
    assert batch.returncode == 0, batch.stderr[-2000:]
    firsts = [q[0]["uri"] for q in json.loads(batch.stdout.strip().splitlines()[-1])]
    assert firsts == [str(images / n) for n in ("000001.jpg", "000002.jpg", "000007.jpg")]
    # One unreadable image in a batch fails the query with one line naming it.
    _one_line_error(lakelens("query", str(index_dir), "--image", str(images)), "broken.jpg")


@pytest.mark.parametrize(("args", "needle"), [
    (["--id", "no-such-id"], "not in this index"),
    (["--vector", "{tmp}/wrong.npy"], "holds dim 128"),
    (["--vector", "{tmp}/missing.npy"], "cannot read --vector"),
    (["--image", "{tmp}/notes.jpg"], "cannot read query image"),
    (["--id", "x", "-k", "0"], "-k must be >= 1"),
])
def test_query_mistakes_are_one_line(indexed: tuple[Path, Path], tmp_path: Path, args: list[str],
                                     needle: str) -> None:
    _, index_dir = indexed
    np.save(tmp_path / "wrong.npy", np.zeros(7, np.float32))
    (tmp_path / "notes.jpg").write_text("text")
    argv = [a.format(tmp=tmp_path) for a in args]
    _one_line_error(lakelens("query", str(index_dir), *argv), needle)


def test_index_command_mistakes_are_one_line(indexed: tuple[Path, Path], tmp_path: Path) -> None:
    _, index_dir = indexed
    _one_line_error(lakelens("query", str(tmp_path / "none"), "--id", "x"), "does not exist")
    _one_line_error(lakelens("index", "build", str(tmp_path / "none"), "--out", str(tmp_path / "i")),
                    "does not exist")
    _one_line_error(lakelens("index", "build", str(index_dir), "--out", str(tmp_path / "i")),
                    "holds no lakelens table")
