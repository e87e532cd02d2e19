"""Listing SOURCE arguments: directories, globs, manifests, URIs (real Ray tasks), and the
per-part staging that feeds the diff."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from models.errors import LakelensError
from pipelines.lake import diff as D
from pipelines.lake.sources import ListItem, image_id, plan_sources, read_bytes


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "a" / "b" / "c" / "d").mkdir(parents=True)
    for name in ("a/one.JPG", "a/b/two.png", "a/three.webp", "a/b/c/d/deep.heic"):
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    (tmp_path / "a" / "readme.md").write_text("x")
    (tmp_path / "a" / "b" / "data.csv").write_text("x")
    return tmp_path


def listed(sources: list[str], tmp_path: Path) -> tuple[list[str], dict[str, int]]:
    plan = plan_sources(sources)
    staging = str(tmp_path / "staging")
    parts = ["0", "4", "8", "c"]  # staging by part: each holds the ids from its prefix up to the next
    skipped = D.stage_listing(D.listing_dataset(plan, staging), staging, parts)
    rows = [D.read_bucket_files(staging, f"listing/{D.part_dir(p)}") for p in parts]
    table = pa.concat_tables([r for r in rows if r is not None])
    return sorted(table.column("uri").to_pylist()), skipped


def test_directory_is_recursive_and_counts_non_images_by_extension(ray_local, tree: Path) -> None:
    plan = plan_sources([str(tree / "a")])
    assert ListItem(str(tree / "a" / "b" / "c"), True) in plan.dirs  # below the spread: one task each
    uris, skipped = listed([str(tree / "a")], tree)
    assert uris == sorted(str(tree / p) for p in ("a/b/two.png", "a/one.JPG", "a/three.webp",
                                                  "a/b/c/d/deep.heic"))
    assert skipped == {".md": 1, ".csv": 1}


def test_glob_file_uri_manifests_and_duplicates(ray_local, tree: Path) -> None:
    (tree / "list.txt").write_text("# images\na/one.JPG\n\n/nowhere/missing.jpg\na/readme.md\n")
    pq.write_table(pa.table({"uri": [str(tree / "a/b/two.png"), str(tree / "a/one.JPG")]}),
                   tree / "m.parquet")
    uris, skipped = listed([str(tree / "a" / "*.*"), f"file://{tree}/a/one.JPG",
                            str(tree / "list.txt"), str(tree / "m.parquet")], tree)
    # Manifests keep every entry (a listed non-image becomes an error row); the staging
    # keeps duplicates, which the diff drops per part.
    assert set(uris) == {str(tree / "a/one.JPG"), str(tree / "a/three.webp"), "/nowhere/missing.jpg",
                         str(tree / "a/readme.md"), str(tree / "a/b/two.png")}
    assert skipped == {".md": 1}  # the glob's readme.md


def test_s3_inventory_style_manifest(tree: Path) -> None:
    from pipelines.lake.sources import parquet_manifest_rows

    batch = pa.table({"bucket": ["lake", "lake"], "key": ["a/x.jpg", "b/y.jpg"], "size": [10, 20],
                      "last_modified_date": pa.array([0, 10**9], pa.timestamp("ms")),
                      "e_tag": ["\"abc\"", None]})
    rows = parquet_manifest_rows(batch, base="s3://lake")
    assert rows.column("uri").to_pylist() == ["s3://lake/a/x.jpg", "s3://lake/b/y.jpg"]
    assert rows.column("size").to_pylist() == [10, 20]
    assert rows.column("etag").to_pylist() == ["\"abc\"", None]
    assert rows.column("mtime_ns").to_pylist() == [0, 10**15]  # 10**9 ms in ns


def test_missing_source_empty_glob_and_bad_manifest_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(LakelensError, match="does not exist"):
        plan_sources([str(tmp_path / "nope")])
    with pytest.raises(LakelensError, match="no SOURCE"):
        plan_sources([])
    pq.write_table(pa.table({"file": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(LakelensError, match="no 'uri' or 'path' column"):
        plan_sources([str(tmp_path / "bad.parquet")])


def test_empty_glob_is_a_user_error(ray_local, tmp_path: Path) -> None:
    with pytest.raises(LakelensError, match="no files match"):
        D.listing_dataset(plan_sources([str(tmp_path / "*.jpg")]), str(tmp_path / "staging"))


def test_image_id_is_stable_and_read_bytes_reads(tree: Path) -> None:
    uri = str(tree / "a/one.JPG")
    assert image_id(uri) == image_id(uri) and len(image_id(uri)) == 32
    assert image_id(uri) != image_id(str(tree / "a/three.webp"))
    assert read_bytes(uri)[:4] == b"\x89PNG"
