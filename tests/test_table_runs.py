"""The schema 4 table through real runs on a local Ray: annotate migrates a schema 3 table
and goes on; the diff keeps what sits under a directory it could not list, keeps a row
whose stat failed, and redoes results of another embedder (a --full run cut short)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable

from pipelines.annotate.job import run
from pipelines.config import AnnotateConfig
from pipelines.lake import diff as D
from pipelines.lake.sources import LISTING_SCHEMA, image_id
from pipelines.lake.table import open_table
from tests.helpers import clustered_vectors, read_current, write_results
from tests.test_nightly import EMBED, write_images
from tests.test_table import SCHEMA3


def night_diff(out: Path, staging: Path, rows: list[dict], **kw) -> D.DiffCounts:
    """The diff of a night whose listing is `rows` (LISTING_SCHEMA dicts), as annotate runs it."""
    import ray

    table = open_table(str(out))
    listing = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=LISTING_SCHEMA))
    D.stage_listing(listing, str(staging), table.parts())
    return D.diff(str(out), str(staging), table.parts(), **{"full": False, "prune": True, **kw})


def listed(uri: str, size: int | None = 10, mtime: int | None = 1) -> dict:
    return {"uri": uri, "size": size, "mtime_ns": mtime, "etag": None, "is_image": True, "list_error": None}


def test_annotate_migrates_a_schema_3_table_then_annotates_and_prunes(ray_local, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(SCHEMA3, out)
    meta = json.loads((out / "lakelens.json").read_text())  # its embedder (dim 4) was never this run's:
    (out / "lakelens.json").write_text(json.dumps({**meta, "embedding_dim": None, "models": {}}))
    paths = write_images(tmp_path / "lake", 12)
    summary = run(AnnotateConfig(sources=(str(tmp_path / "lake"),), out=str(out), prune=True,
                                 chunk_size=5, **EMBED))
    assert (summary.new, summary.annotated, summary.vanished) == (12, 12, 29)
    assert sorted(read_current(out, None).column("uri").to_pylist()) == sorted(map(str, paths))
    log = DeltaTable(str(out / "log")).to_pandas()
    assert (log["status"] == "tombstone").sum() == 29 and set(log["reason"]) == {"new", "vanished"}
    assert len(DeltaTable(str(out / "table")).to_pandas()) == 35  # the history before, untouched


def test_diff_keeps_unlisted_dirs_and_failed_stats_redoes_other_embedders(ray_local, tmp_path: Path) -> None:
    out = tmp_path / "out"
    a = [f"/lake/a/{i}.jpg" for i in range(20)]
    b = [f"/lake/b/{i}.jpg" for i in range(10)]
    ids = [image_id(u) for u in a + b]
    write_results(out, clustered_vectors(30, 4), ids=ids, embedder=("tiny", "random:seed0"))
    # rows with uris of their own (write_results names them /lake/<id>.jpg): rewrite the uris
    table = open_table(str(out))
    rows = table.current_table().to_pylist()
    for r in rows:
        r["uri"] = (a + b)[ids.index(r["image_id"])]
        r["fingerprint"] = "10:1"
    other = set(ids[:3])  # three results made by another embedder
    for r in rows:
        if r["image_id"] in other:
            r["models"] = [{"task": "embed", "arch": "tiny", "weights": "sha256:other"}]
    table.commit(pa.Table.from_pylist(rows, schema=table.current_table().schema), run_id="uris", seq=1,
                 epoch=1)
    night = [listed(u) for u in a[:-1]]  # a/19 gone; every a/ file unchanged
    night[5] = listed(a[5], size=None, mtime=None)  # its stat failed: not a change
    night.append({"uri": "/lake/b", "size": None, "mtime_ns": None, "etag": None, "is_image": False,
                  "list_error": "PermissionError: [Errno 13] Permission denied"})
    counts = night_diff(out, tmp_path / "s1", night, embed_weights="random:seed0")
    assert counts.unlisted_dirs == ("/lake/b",) and counts.unlistable == 10
    assert counts.vanished == 1  # a/19 only: nothing under /lake/b is taken for vanished
    assert (counts.changed, counts.stale, counts.unchanged) == (0, 3, 16)
    todo = D.read_bucket_files(str(tmp_path / "s1"), "todo")
    assert sorted(todo.column("kind").to_pylist()) == ["stale"] * 3
    gone = D.read_bucket_files(str(tmp_path / "s1"), "vanished")
    assert gone.column("uri").to_pylist() == [a[19]]
    # without the embedder's check (a run that embeds nothing) those rows are unchanged
    counts = night_diff(out, tmp_path / "s2", night)
    assert (counts.stale, counts.unchanged) == (0, 19)
    assert counts.listed == 19


def test_an_image_that_crashes_again_on_its_retry_waits_for_new_bytes(tmp_path: Path) -> None:
    """A first WorkerCrashed is retried by the next run; one that crashed on that retry is
    permanent (the soak found poison images retried, and failing the night, every night)."""
    import pyarrow as pa

    from pipelines.annotate.commit import Committer
    from pipelines.lake.table import create_or_open

    table = create_or_open(str(tmp_path / "out"))
    todo = pa.table({"image_id": ["a" * 32, "b" * 32], "uri": ["/l/a.png", "/l/b.png"],
                     "size": pa.array([1, 2], pa.int64()), "fingerprint": ["fa", "fb"],
                     "kind": ["new", "retry"]})
    committer = Committer(table, "run-1", 1, [], chunk_size=10)
    committer.add_crashed(todo, "the worker died")
    committer.flush()
    rows = DeltaTable(str(tmp_path / "out" / "log")).to_pyarrow_table().sort_by("image_id")
    assert rows.column("error_type").to_pylist() == ["WorkerCrashed"] * 2
    assert rows.column("error_retryable").to_pylist() == [True, False]
    assert rows.column("reason").to_pylist() == ["crashed", "crashed"]
