"""Listing directories in pieces: a large flat directory or S3 prefix split into name ranges
that list every file exactly once (real files on disk, a real moto S3 server), and a
directory that cannot be listed reported as a marker row instead of looking empty."""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.lake import diff as D
from pipelines.lake import sources as S
from pipelines.lake.sources import LISTING_SCHEMA, ListItem, list_dir, plan_sources
from tests.test_s3 import BUCKET
from tests.test_s3 import s3 as s3  # noqa: F401  (the moto server fixture)


def rows(items: list[ListItem]) -> pa.Table:
    tables = [t for i in items for t in list_dir(i.root, i.recursive, i.start, i.end)]
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()


def all_files(root: Path) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)


def assert_partition(items: list[ListItem]) -> None:
    """Per root, the ranges run from unbounded to unbounded, each starting where the last ended."""
    by_root: dict[str, list[ListItem]] = {}
    for i in items:
        by_root.setdefault(i.root, []).append(i)
    for ranges in by_root.values():
        assert ranges[0].start is None and ranges[-1].end is None
        assert all(a.end == b.start and a.end is not None for a, b in zip(ranges, ranges[1:], strict=False))


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    """3,000 small files of mixed names in one directory, and one subdirectory."""
    d = tmp_path / "flat"
    (d / "sub").mkdir(parents=True)
    rand = random.Random(7)
    names = {f"IMG_{i:05d}.jpg" for i in range(2000)}
    names |= {f"{rand.getrandbits(40):010x}.png" for _ in range(900)}
    names |= {f"Z{i}.JPG" for i in range(90)} | {"readme.md", "a", "b b.jpg", "é.jpg", "~.jpg"}
    for name in names:
        (d / name).write_bytes(b"x")
    for name in ("one.jpg", "two.jpg"):
        (d / "sub" / name).write_bytes(b"x")
    return d


# -- local --------------------------------------------------------------------------------

def test_flat_directory_is_split_into_ranges_that_list_every_file_once(flat: Path, monkeypatch) -> None:
    monkeypatch.setattr(S, "SPLIT_FILES", 500)
    plan = plan_sources([str(flat)])
    ranges = [i for i in plan.dirs if i.root == str(flat)]
    assert len(ranges) >= 5 and not any(i.recursive for i in ranges)
    assert_partition(ranges)
    assert ListItem(str(flat / "sub"), False) in plan.dirs  # subdirectories are planned as before
    listed = rows(plan.dirs)
    uris = listed.column("uri").to_pylist()
    assert Counter(uris).most_common(1)[0][1] == 1  # no file twice
    assert sorted(uris) == all_files(flat)  # and none missing
    assert listed.column("list_error").null_count == listed.num_rows
    sizes = [rows([i]).num_rows for i in ranges]
    assert max(sizes) <= 3 * 500 and min(sizes) > 0  # quantiles of the sample: roughly even


def test_small_directory_stays_one_item(flat: Path) -> None:
    plan = plan_sources([str(flat)])
    assert plan.dirs[0] == ListItem(str(flat), False)


def test_recursive_ranges_partition_a_tree(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for rel in ("a.jpg", "m", "m0.jpg", "m/x.jpg", "m/y/z.jpg", "m/y0.jpg", "n/a.jpg", "zz/q/r.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel != "m":
            (root / rel).write_bytes(b"x")
    everything = all_files(root)
    for points in ([], ["m"], ["m/"], ["m/y", "m/y/z.jpg"], ["a.jpg", "m/x.jpg", "m0", "n", "zz/q/r.png"]):
        uris = rows(S._ranges(str(root), True, points)).column("uri").to_pylist()
        assert sorted(uris) == everything and len(uris) == len(everything), points


# -- directories that cannot be listed ---------------------------------------------------------

def test_unreadable_directory_is_a_marker_row_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "lake" / "locked").mkdir(parents=True)
    (tmp_path / "lake" / "locked" / "x.jpg").write_bytes(b"x")
    (tmp_path / "lake" / "open.jpg").write_bytes(b"x")
    locked = tmp_path / "lake" / "locked"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop listing")
        plan = plan_sources([str(tmp_path / "lake")])  # the driver does not fail on it
        assert ListItem(str(locked), True) in plan.dirs
        listed = rows(plan.dirs).to_pylist()
    finally:
        locked.chmod(0o755)
    marker = next(r for r in listed if r["list_error"])
    assert marker == {"uri": str(locked), "size": None, "mtime_ns": None, "etag": None,
                      "is_image": False, "list_error": "PermissionError: [Errno 13] Permission denied"}
    assert [r["uri"] for r in listed if not r["list_error"]] == [str(tmp_path / "lake" / "open.jpg")]


def test_directory_gone_after_planning_or_a_broken_link_is_a_marker_row(tmp_path: Path,
                                                                        monkeypatch) -> None:
    """Fails as root too: a directory and a split directory that vanished after the plan,
    a dangling symlink to a directory and a symlink loop named as directories to list."""
    lake = tmp_path / "lake"
    for rel in ("a/one.jpg", "b/two.jpg", "flat/x1.jpg", "flat/x2.jpg", "flat/x3.jpg"):
        (lake / rel).parent.mkdir(parents=True, exist_ok=True)
        (lake / rel).write_bytes(b"x")
    monkeypatch.setattr(S, "SPLIT_FILES", 2)
    plan = plan_sources([str(lake)])
    assert sum(i.root == str(lake / "flat") for i in plan.dirs) == 2
    shutil.rmtree(lake / "a")
    shutil.rmtree(lake / "flat")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    listed = rows([*plan.dirs, ListItem(str(tmp_path / "dangling"), True),
                   ListItem(str(tmp_path / "loop"), False)]).to_pylist()
    errors = sorted((r["uri"], r["list_error"]) for r in listed if r["list_error"])
    gone = "FileNotFoundError: [Errno 2] No such file or directory"
    assert errors == [(str(tmp_path / "dangling"), gone), (str(lake / "a"), gone), (str(lake / "flat"), gone),
                      (str(lake / "flat"), gone),
                      (str(tmp_path / "loop"), "OSError: [Errno 40] Too many levels of symbolic links")]
    assert all(not r["is_image"] and r["size"] is None for r in listed if r["list_error"])
    assert [r["uri"] for r in listed if not r["list_error"]] == [str(lake / "b" / "two.jpg")]


def test_listing_dataset_carries_ranges_and_markers_through_ray(ray_local, flat: Path,
                                                                monkeypatch) -> None:
    monkeypatch.setattr(S, "SPLIT_FILES", 1000)
    plan = plan_sources([str(flat)])
    assert sum(i.start is not None for i in plan.dirs) >= 2
    shutil.rmtree(flat / "sub")
    staging = str(flat.parent / "staging")
    ds = D.listing_dataset(plan, staging)
    listed = pa.concat_tables(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    assert listed.schema == LISTING_SCHEMA
    errors = listed.filter(listed.column("list_error").is_valid())
    assert errors.column("uri").to_pylist() == [str(flat / "sub")]
    uris = listed.filter(listed.column("list_error").is_null()).column("uri").to_pylist()
    assert sorted(uris) == all_files(flat) and len(set(uris)) == len(uris)
    skipped = D.stage_listing(D.listing_dataset(plan, staging), staging, ["0", "8"])
    assert skipped == {".md": 1, "(none)": 1}  # "a"; the marker row is staged for the diff instead
    assert D.unlisted_dirs(staging) == [str(flat / "sub")]


def test_every_listing_producer_fills_list_error(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"x")
    tables = [S.stat_uris([str(tmp_path / "x.jpg")]), S.text_manifest_rows(["x.jpg", "# c"], str(tmp_path)),
              S.parquet_manifest_rows(pa.table({"uri": ["x.jpg"], "is_image": [True]}), str(tmp_path)),
              *list_dir(str(tmp_path), False)]
    for t in tables:
        assert t.schema == LISTING_SCHEMA and t.column("list_error").to_pylist() == [None]
    pq.write_table(tables[0], tmp_path / "m.parquet")  # and a listing table round-trips
    assert pq.read_table(tmp_path / "m.parquet").schema == LISTING_SCHEMA


# -- S3 (moto) ----------------------------------------------------------------------------------

def test_s3_prefix_is_split_by_leading_characters_listing_every_key_once(s3, monkeypatch) -> None:
    client = s3["client"]
    rand = random.Random(3)
    keys = [f"flat/IMG_{i:05d}.jpg" for i in range(400)]
    keys += [f"flat/{rand.getrandbits(32):08x}.png" for _ in range(300)]
    keys += ["flat/sub/a.jpg", "flat/sub/deeper/b.jpg", "flat/z", "flat/IMG_", "flat/é.jpg"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=BUCKET, Key=k, Body=b"xy"), keys))
    client.put_object(Bucket=BUCKET, Key="flat/sub/", Body=b"")  # a "folder" object: not a file
    client.put_object(Bucket=BUCKET, Key="flatter/no.jpg", Body=b"x")  # shares the prefix's letters
    monkeypatch.setattr(S, "SPLIT_FILES", 150)
    monkeypatch.setattr(S, "REMOTE_RANGES", 24)
    monkeypatch.setattr(S, "S3_PAGE", 50)  # moto answers a call in time linear in its keys
    S._cached_filesystem.cache_clear()
    root = f"s3://{BUCKET}/flat"
    plan = plan_sources([root])
    assert 10 <= len(plan.dirs) <= 24 and all(i.root == root and i.recursive for i in plan.dirs)
    assert_partition(plan.dirs)
    listed = rows(plan.dirs)
    uris = listed.column("uri").to_pylist()
    assert len(uris) == len(set(uris)) and sorted(uris) == sorted(f"s3://{BUCKET}/{k}" for k in keys)
    assert set(listed.column("size").to_pylist()) == {2}
    assert listed.column("list_error").null_count == listed.num_rows
    sizes = [rows([i]).num_rows for i in plan.dirs]
    assert max(sizes) <= 150  # "IMG_" split further: no range holds most of the prefix

    # pyarrow's listing (no boto3) gives the same rows, the same mtimes included (so
    # fingerprints do not change with the lister), and honours the same ranges.
    some = [plan.dirs[0], plan.dirs[len(plan.dirs) // 2], plan.dirs[-1]]
    expected = rows(some).sort_by("uri")
    monkeypatch.setattr(S, "_s3_client", lambda: None)
    assert rows([ListItem(root, True)]).sort_by("uri").equals(listed.sort_by("uri"))
    assert rows(some).sort_by("uri").equals(expected)


def test_small_s3_prefix_is_spread_by_subdirectory(s3) -> None:
    client = s3["client"]
    for key in ("small/a.jpg", "small/x/b.jpg", "small/x/y/c.jpg", "small/x/y/z/d.jpg"):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    root = f"s3://{BUCKET}/small"
    plan = plan_sources([root])
    assert plan.dirs == [ListItem(root, False), ListItem(f"{root}/x", False), ListItem(f"{root}/x/y", True)]
    assert sorted(rows(plan.dirs).column("uri").to_pylist()) == [
        f"{root}/a.jpg", f"{root}/x/b.jpg", f"{root}/x/y/c.jpg", f"{root}/x/y/z/d.jpg"]


def test_s3_prefix_that_cannot_be_listed_is_a_marker_row(s3) -> None:
    listed = rows([ListItem("s3://no-such-bucket/lake", True),
                   ListItem("s3://no-such-bucket/l", False, "a", "b")])
    assert listed.column("uri").to_pylist() == ["s3://no-such-bucket/lake", "s3://no-such-bucket/l"]
    assert listed.column("is_image").to_pylist() == [False, False]
    for error in listed.column("list_error").to_pylist():
        assert "NoSuchBucket" in error and "\n" not in error


def _todo_file(path: Path, ids: list[str], group: int) -> None:
    n = len(ids)
    table = pa.table({"image_id": ids, "part": ["p"] * n, "uri": [f"file:///{i}.jpg" for i in ids],
                      "size": [1] * n, "fingerprint": ["f"] * n, "kind": ["new"] * n}, schema=D.TODO_SCHEMA)
    pq.write_table(table, path, row_group_size=group)


@pytest.mark.parametrize("go", [True, False])
def test_an_awaited_todo_waits_for_its_release_then_streams_a_block_per_row_group(
        ray_local, tmp_path: Path, go: bool) -> None:
    """The annotate pipeline starts before the diff: its input waits for the driver's word
    (nothing comes out before), then yields what the diff staged, a block per row group
    (so rows reach the actors and the first commit as they do from todo_dataset), or no
    rows when the run stops."""
    import threading
    import time

    staging = tmp_path / "staging"
    ds = D.awaited_todo_dataset(str(staging), "todo", slots=2, num_cpus=0.25)
    blocks: list[pa.Table] = []
    consumer = threading.Thread(target=lambda: blocks.extend(
        ds.iter_batches(batch_size=None, batch_format="pyarrow")), daemon=True)
    consumer.start()
    (staging / "todo").mkdir(parents=True)
    _todo_file(staging / "todo" / "a.parquet", [f"a{i}" for i in range(7)], group=3)  # 3 groups
    _todo_file(staging / "todo" / "b.parquet", [f"b{i}" for i in range(2)], group=3)  # 1 group
    time.sleep(3)  # the diff is "still running": the input tasks wait
    assert consumer.is_alive() and blocks == []
    D.release_todo(str(staging), "todo", go=go)
    consumer.join(timeout=120)
    assert not consumer.is_alive()
    if not go:
        assert sum(b.num_rows for b in blocks) == 0
        return
    ids = sorted(i for b in blocks for i in b.column("image_id").to_pylist())
    assert ids == sorted([f"a{i}" for i in range(7)] + ["b0", "b1"])
    assert sorted(b.num_rows for b in blocks) == [1, 2, 3, 3]  # one block per row group
