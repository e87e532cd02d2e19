"""Object storage end to end: annotate s3://… into an s3:// table and index, then results,
export, eval, render and query against them. The S3 server is a real one on loopback
(moto's, a separate process); credentials reach lakelens through the environment only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.synth import write_lake
from tests.helpers import moto_s3
from tests.test_cli import lakelens  # the AWS_* variables the fixture set reach it via the environment

BUCKET = "lakes"
TINY = ["--tasks", "detect,embed", "--arch", "detect=fasterrcnn_mobilenet_v3_large_320_fpn",
        "--arch", "embed=tiny", "--weights", "random", "--score-threshold", "0.0", "--num-cpus", "2"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server on 127.0.0.1 with a bucket holding a synthetic lake under lake/."""
    boto3 = pytest.importorskip("boto3")
    with moto_s3(tmp_path_factory.mktemp("moto")) as env, pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.setenv("LAKELENS_CACHE", str(tmp_path_factory.mktemp("cache")))
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        gt = Path(write_lake(tmp_path_factory.mktemp("lake") / "lake", images=6, seed=1))
        for p in gt.parent.rglob("*"):
            if p.is_file():
                client.upload_file(str(p), BUCKET, f"lake/{p.relative_to(gt.parent)}")
        yield {"client": client}


@pytest.mark.slow  # ~50 s; the S3 index race and the byte cap stay in the default run
def test_annotate_index_and_read_back_everything_from_s3(s3, tmp_path: Path) -> None:
    lake, out, index = f"s3://{BUCKET}/lake", f"s3://{BUCKET}/out", f"s3://{BUCKET}/index"
    proc = lakelens("annotate", lake, "--out", out, "--index", index, *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 annotated, 0 errors" in proc.stdout
    keys = {o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert any(k.startswith("out/log/_delta_log/") for k in keys)
    assert any(k.startswith("out/current/part=") for k in keys)
    assert any(k.startswith("out/runs/") for k in keys) and "index/CURRENT" in keys

    from index.store import open_index
    from pipelines.coco import evaluate, export
    from pipelines.lake.results import query
    from pipelines.render import render

    table = query(out, "SELECT image_id, uri, status, embedding FROM results")
    assert table.num_rows == 6 and set(table["status"].to_pylist()) == {"ok"}
    assert all(u.startswith(f"s3://{BUCKET}/lake/images/") for u in table["uri"].to_pylist())

    paths = export(out, str(tmp_path / "preds.json"))
    boxes = json.loads(Path(paths["bbox"]).read_text())
    assert {b["image_id"] for b in boxes} == set(range(1, 7))  # score threshold 0: boxes everywhere
    # against the ground truth on S3 (raises when no image matches by its S3 path)
    export(out, str(tmp_path / "gt-preds.json"), gt_path=f"s3://{BUCKET}/lake/annotations.json")

    report = evaluate(out, f"s3://{BUCKET}/lake/annotations.json")
    assert report["images"] == 6 and report["unmatched_images"] == 0
    assert "bbox" in report["tasks"]

    written, failed = render(out, str(tmp_path / "png"))
    assert (written, failed) == (6, 0) and len(list((tmp_path / "png").glob("*.png"))) == 6

    idx = open_index(index)
    assert len(idx) == 6
    some = table["image_id"][0].as_py()
    found = idx.search_ids([some], k=3)
    assert found.image_ids[0][0] == some and len(found.image_ids[0]) == 3

    q = lakelens("query", index, "--id", some, "-k", "2", "--json")
    assert q.returncode == 0, q.stderr[-2000:]
    assert json.loads(q.stdout.strip().splitlines()[-1])[0][0]["image_id"] == some
    ev = lakelens("eval", out, "--gt", f"s3://{BUCKET}/lake/annotations.json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    saved = json.loads(s3["client"].get_object(Bucket=BUCKET, Key="out/eval.json")["Body"].read())
    assert saved["images"] == 6

    again = lakelens("annotate", lake, "--out", out, "--index", index, *TINY)  # nothing new
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 annotated, 0 errors" in again.stdout and "6 unchanged" in again.stdout


def test_annotates_read_stage_refuses_an_s3_object_over_the_byte_cap(s3) -> None:
    """The size S3 reports on open is checked before any byte is fetched: an error row
    naming the size and the cap, not retried (permanent until the object changes)."""
    import io

    import pyarrow as pa
    from PIL import Image

    from pipelines.annotate.read import read_decode
    from pipelines.lake.sources import image_id

    big, small = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (700, 700), (1, 2, 3)).save(big, format="BMP")  # 1.4 MiB, uncompressed
    Image.new("RGB", (40, 30), (9, 9, 9)).save(small, format="PNG")
    s3["client"].put_object(Bucket=BUCKET, Key="cap/big.bmp", Body=big.getvalue())
    s3["client"].put_object(Bucket=BUCKET, Key="cap/small.png", Body=small.getvalue())
    uris = [f"s3://{BUCKET}/cap/big.bmp", f"s3://{BUCKET}/cap/small.png"]
    out = read_decode(pa.table({"image_id": [image_id(u) for u in uris], "uri": uris}),
                      max_pixels=10**8, short=None, long=64, max_bytes=2**20)
    rows = out.select(["error_stage", "error_type", "error_message", "read_retries", "dec_width",
                       "content_hash"]).to_pylist()
    n = len(big.getvalue())
    assert rows[0] == {"error_stage": "read", "error_type": "FileTooLargeError", "read_retries": 0,
                       "error_message": f"the file is {n} bytes (1.4 MiB), over the cap of 1048576 bytes "
                                        "(1 MiB, --max-image-mb)", "dec_width": None, "content_hash": None}
    assert rows[1]["error_type"] is None and rows[1]["dec_width"] == 40 and rows[1]["read_retries"] == 0


def test_two_index_writers_on_s3_one_switches_current(s3, tmp_path: Path) -> None:
    """CURRENT on S3 is switched with a conditional PUT against the CURRENT each writer
    read when it began: of two writers that began from the same version, the second to
    switch is refused in one line and leaves the first's version live."""
    import faiss
    import numpy as np
    import pyarrow as pa

    from index.store import open_index
    from index.versions import IDS_SCHEMA, Writer, read_current, save
    from models.errors import LakelensError

    uri = f"s3://{BUCKET}/raced-index"
    x = np.eye(4, dtype=np.float32)

    def version(n: int) -> tuple[faiss.Index, pa.Table, dict]:
        index = faiss.IndexFlatIP(4)
        index.add(x[:n])
        ids = pa.table({"image_id": [f"i{j}" for j in range(n)], "uri": [f"u{j}" for j in range(n)],
                        "content_hash": ["h"] * n}, schema=IDS_SCHEMA)
        return index, ids, {"dim": 4, "metric": "ip", "count": n, "factory": "Flat", "embedder": {}}

    first = save(uri, *version(1))
    a, b = Writer(uri), Writer(uri)  # both begin from `first`
    index, ids, manifest = version(2)
    won = a.commit(manifest, [a.write_segment(index, ids, start=0)], None)
    index, ids, manifest = version(3)
    with pytest.raises(LakelensError, match="CURRENT changed while this version was written") as e:
        b.commit(manifest, [b.write_segment(index, ids, start=0)], None)
    assert "\n" not in str(e.value)
    assert read_current(uri) == won != first
    assert len(open_index(uri)) == 2
    keys = {o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="raced-index/")["Contents"]}
    assert f"raced-index/{first}/manifest.json" in keys  # the previous version is kept
