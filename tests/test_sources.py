"""Listing SOURCE arguments: directories, globs, manifests, URIs."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pipelines.sources import image_id, list_sources, read_bytes

from models.errors import LakelensError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/one.JPG", "a/b/two.png", "a/three.webp"):
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    (tmp_path / "a" / "readme.md").write_text("x")
    (tmp_path / "a" / "b" / "data.csv").write_text("x")
    return tmp_path


def test_directory_is_recursive_sorted_and_counts_non_images(tree: Path) -> None:
    listing = list_sources([str(tree / "a")])
    assert listing.uris == [str(tree / "a/b/two.png"), str(tree / "a/one.JPG"),
                            str(tree / "a/three.webp")]
    assert listing.skipped == 2


def test_glob_file_uri_and_duplicates(tree: Path) -> None:
    listing = list_sources([str(tree / "a" / "*.*"), f"file://{tree}/a/one.JPG"])
    assert listing.uris == [str(tree / "a/one.JPG"), str(tree / "a/three.webp")]
    assert listing.skipped == 1  # readme.md


def test_text_and_parquet_manifests_keep_every_entry(tree: Path) -> None:
    (tree / "list.txt").write_text("# images\na/one.JPG\n\n/nowhere/missing.jpg\na/readme.md\n")
    listing = list_sources([str(tree / "list.txt")])
    assert listing.uris == [str(tree / "a/one.JPG"), "/nowhere/missing.jpg",
                            str(tree / "a/readme.md")]
    pq.write_table(pa.table({"uri": [str(tree / "a/b/two.png")]}), tree / "m.parquet")
    assert list_sources([str(tree / "m.parquet")]).uris == [str(tree / "a/b/two.png")]
    pq.write_table(pa.table({"file": ["x"]}), tree / "bad.parquet")
    with pytest.raises(LakelensError, match="no 'uri' or 'path' column"):
        list_sources([str(tree / "bad.parquet")])


def test_missing_source_and_empty_glob_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(LakelensError, match="does not exist"):
        list_sources([str(tmp_path / "nope")])
    with pytest.raises(LakelensError, match="no files match"):
        list_sources([str(tmp_path / "*.jpg")])
    with pytest.raises(LakelensError, match="no SOURCE"):
        list_sources([])


def test_image_id_is_stable_and_read_bytes_reads(tree: Path) -> None:
    uri = str(tree / "a/one.JPG")
    assert image_id(uri) == image_id(uri) and len(image_id(uri)) == 32
    assert image_id(uri) != image_id(str(tree / "a/three.webp"))
    assert read_bytes(uri)[:4] == b"\x89PNG"
