"""Lake scale: what a night costs as the table grows (issue "Lake scale I").

Synthetic tables are written through lakelens's own commit path (LakeTable.commit, the
call the annotate commit loop makes; rows generated directly, no model: 5 detections,
one instance with an RLE mask, a DIM-d embedding per image), then upkept once
(pipelines.lake.upkeep: the snapshot). Then nights: each appends 1% new images, 0.1%
changed images and 0.01% tombstones (vanished, --prune) in commits of CHUNK rows, then
runs upkeep (parts whose changes reached their share are rebuilt, split past
max_part_rows). The build and the nights of each size run in processes of their own (the nights' peak
RSS is theirs alone). `--reuse` runs more nights on tables an earlier run built.

Reported per size: bytes written per night (every new file under log/ and current/,
upkeep included) / bytes of that night's rows (its new log files), amortised over the
nights; night wall time and driver peak RSS; after the nights, file count and median file
size; DuckDB over the current view (`lakelens results --sql`'s views): count(*) and a
point lookup by image_id. Plus one night with the same absolute number of changes at
every size (wall and RSS ratios of the largest size to the smallest). Baseline in the
same run: the schema 3 design's cost for the same night is not re-run here (its MERGE
rewrote every file holding a changed id); the amortised bytes ratio is the comparison.

The night here is the table's part of a night (commit loop + upkeep): listing and the
diff read the whole listing by nature and are measured by benchmarks/nightly.py.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

CHUNK = 100_000
HEXCHARS = np.frombuffer(b"0123456789abcdef", np.uint8)


def hex_ids(idx: np.ndarray, salt: int = 0) -> pa.Array:
    """32-hex-digit ids from integers, vectorised (a bijective mix, like a hash's spread)."""
    x = (idx.astype(np.uint64) + np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
    y = (x ^ (x >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)
    b = np.stack([x, y], 1).astype(">u8").view(np.uint8).reshape(len(idx), 16)
    out = np.empty((len(idx), 32), np.uint8)
    out[:, 0::2], out[:, 1::2] = HEXCHARS[b >> 4], HEXCHARS[b & 15]
    offsets = np.arange(0, 32 * len(idx) + 1, 32, dtype=np.int32)
    return pa.StringArray.from_buffers(len(idx), pa.py_buffer(offsets), pa.py_buffer(out.tobytes()))


def synthetic_rows(idx: np.ndarray, *, dim: int, version: int, reason: str, rng) -> pa.Table:
    from pipelines.schema import TABLE_SCHEMA

    n = len(idx)
    ids = hex_ids(idx)
    tag = pa.scalar(f"-v{version}")
    cols: dict[str, pa.Array] = {
        "image_id": ids,
        "uri": pc_join("s3://lake/images/", ids, pa.scalar(".jpg")),
        "content_hash": pc_join("", hex_ids(idx, salt=version + 1), pa.scalar("")),
        "size": pa.array(rng.integers(50_000, 500_000, n)),
        "fingerprint": pc_join("etag:", hex_ids(idx, salt=7 * version + 3), tag),
        "status": pa.array(np.full(n, "ok", object), pa.string()),
        "width": pa.array(np.full(n, 640, np.int32)), "height": pa.array(np.full(n, 480, np.int32)),
        "run_id": pa.array(np.full(n, f"night-{version}", object), pa.string()),
        "reason": pa.array(np.full(n, reason, object), pa.string()),
        "annotated_at": pa.array(np.full(n, 1_700_000_000_000_000 + version, np.int64)).cast(
            TABLE_SCHEMA.field("annotated_at").type),
    }
    names = pa.array([f"class{i}" for i in range(91)])

    def dets(k: int, with_mask: bool) -> pa.Array:
        m = n * k
        box = pa.ListArray.from_arrays(pa.array(np.arange(0, 4 * m + 1, 4, dtype=np.int32)),
                                       pa.array(rng.random(4 * m, dtype=np.float32) * 640))
        label = rng.integers(0, 91, m).astype(np.int32)
        score = pa.array(rng.random(m, dtype=np.float32))
        arrays = [box, pa.array(label), names.take(pa.array(label)), score]
        fields = ["box", "label", "label_name", "score"]
        if with_mask:
            size = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * m + 1, 2, dtype=np.int32)),
                                            pa.array(np.tile(np.array([480, 640], np.int32), m)))
            counts = pc_join("", hex_ids(np.arange(m) + version * 10**9, salt=11), pa.scalar("PT0a1O2"))
            arrays.append(pa.StructArray.from_arrays([size, counts], names=["size", "counts"]))
            fields.append("mask")
        return pa.ListArray.from_arrays(pa.array(np.arange(0, m + 1, k, dtype=np.int32)),
                                        pa.StructArray.from_arrays(arrays, names=fields))

    cols["detections"] = dets(5, False)
    cols["instances"] = dets(1, True)
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cols["embedding"] = pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)),
                                                 pa.array(emb.ravel()))
    model = pa.array([{"task": "embed", "arch": "bench", "weights": "random:seed0"}],
                     TABLE_SCHEMA.field("models").type.value_type)
    cols["models"] = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)),
                                              model.take(pa.array(np.zeros(n, np.int64))))
    return pa.table({f.name: cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type)
                     for f in TABLE_SCHEMA}, schema=TABLE_SCHEMA)


def pc_join(prefix: str, middle: pa.Array, suffix: pa.Scalar) -> pa.Array:
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(pa.scalar(prefix), middle, suffix, pa.scalar(""))


def tombstones(idx: np.ndarray, *, version: int) -> pa.Table:
    from pipelines.schema import TABLE_SCHEMA

    n = len(idx)
    cols = {"image_id": hex_ids(idx), "status": pa.array(["tombstone"] * n),
            "reason": pa.array(["vanished"] * n), "run_id": pa.array([f"night-{version}"] * n)}
    return pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in TABLE_SCHEMA},
                    schema=TABLE_SCHEMA)


def _peak_rss():
    """benchmarks/nightly.py's PeakRSS (this folder is not on sys.path: its index.py would
    shadow the index package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lakelens_bench_nightly",
                                                  Path(__file__).with_name("nightly.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PeakRSS


def files_under(path: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in path.rglob("*.parquet") if "_delta_log" not in p.parts}


STATE = "bench_state.json"


def child_build(out: str, rows: int, dim: int, seed: int) -> None:
    """A table of `rows` images through the commit path, then its first upkeep."""
    from pipelines.lake.table import create_or_open, open_table, save_meta
    from pipelines.lake.upkeep import run_upkeep

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    table = create_or_open(out)
    table.meta.update({"embedding_dim": dim})
    save_meta(table)
    seq = 0
    for lo in range(0, rows, CHUNK):
        seq += 1
        table.commit(synthetic_rows(np.arange(lo, min(rows, lo + CHUNK)), dim=dim, version=0, reason="new",
                                    rng=rng), run_id="build", seq=seq, epoch=1)
    run_upkeep(open_table(out))
    state = {"rows": rows, "live_hi": rows, "version": 0, "seq": seq, "gone": [],
             "build_s": round(time.perf_counter() - t0, 1)}
    (Path(out) / STATE).write_text(json.dumps(state))
    print(json.dumps({"built": rows, "build_s": state["build_s"]}))


def child_nights(out: str, nights: int, dim: int, fixed: int, seed: int,
                 pcts: tuple[float, float, float]) -> None:
    """Nights on a built table, in a process of their own (its peak RSS is the nights')."""
    from pipelines.lake import results
    from pipelines.lake.table import open_table
    from pipelines.lake.upkeep import run_upkeep

    PeakRSS = _peak_rss()  # noqa: N806
    root = Path(out)
    state = json.loads((root / STATE).read_text())
    rng = np.random.default_rng(seed + state["version"])
    rows = state["rows"]
    gone = set(state["gone"])

    def night(new: int, changed: int, vanished: int) -> dict:
        live_hi = state["live_hi"]
        state["version"] += 1
        version = state["version"]
        before = files_under(root)
        pick = np.unique(rng.integers(0, live_hi, 2 * (changed + vanished) + 16))
        pick = rng.permutation(np.array([i for i in pick if i not in gone], dtype=np.int64))
        change, vanish = pick[:changed], pick[changed:changed + vanished]
        todo = np.concatenate([np.arange(live_hi, live_hi + new), change])
        with PeakRSS() as rss:
            t = time.perf_counter()
            table = open_table(out)
            for lo in range(0, len(todo), CHUNK):
                state["seq"] += 1
                batch = synthetic_rows(todo[lo:lo + CHUNK], dim=dim, version=version,
                                       reason="new" if lo < new else "changed", rng=rng)
                table.commit(batch, run_id="nights", seq=state["seq"], epoch=1)
            if len(vanish):
                state["seq"] += 1
                table.commit(tombstones(vanish, version=version), run_id="nights", seq=state["seq"], epoch=1)
            appended = set(table.log.file_uris())
            up = run_upkeep(table)
            wall = time.perf_counter() - t
        after = files_under(root)
        written = sum(s for p, s in after.items() if p not in before)
        night_rows = sum(s for p, s in after.items() if p not in before and p in appended)
        state["live_hi"] = live_hi + new
        gone.update(int(i) for i in vanish)
        return {"wall_s": round(wall, 3), "rows_bytes": night_rows, "written_bytes": written,
                "ratio": round(written / max(night_rows, 1), 3), "rebuilt": up["rebuilt"],
                "rows_rewritten": up["rows_rewritten"], "peak_rss": rss.peak}

    new_p, changed_p, vanished_p = pcts
    per_night = [night(int(rows * new_p / 100), int(rows * changed_p / 100), int(rows * vanished_p / 100))
                 for _ in range(nights)]
    fixed_night = night(fixed, fixed // 10, fixed // 100)
    state["gone"] = sorted(gone)
    (root / STATE).write_text(json.dumps(state))
    files = files_under(root / "log") | files_under(root / "current")
    table = open_table(out)
    live = set(table.log.file_uris()) | set(table.snap.file_uris())
    sizes = [s for p, s in files.items() if p in live]
    con = results.connect(out)
    t = time.perf_counter()
    count = con.execute("SELECT count(*) FROM current").fetchone()[0]
    count_s = time.perf_counter() - t
    t = time.perf_counter()  # DuckDB reads every column of an Arrow scan for a bare count(*)
    assert con.execute("SELECT count(image_id) FROM current").fetchone()[0] == count
    count_id_s = time.perf_counter() - t
    probe = hex_ids(np.array([rows // 3])).to_pylist()[0]
    t = time.perf_counter()
    hit = con.execute("SELECT uri FROM current WHERE image_id = ?", [probe]).fetchall()
    lookup_s = time.perf_counter() - t
    written = sum(n["written_bytes"] for n in per_night)
    night_bytes = sum(n["rows_bytes"] for n in per_night)
    print(json.dumps({
        "rows": rows, "build_s": state["build_s"], "nights": nights, "night_pcts": list(pcts),
        "bytes_ratio_amortised": round(written / max(night_bytes, 1), 3),
        "bytes_ratio_max_night": max(n["ratio"] for n in per_night),
        "night_wall_s_median": statistics.median(n["wall_s"] for n in per_night),
        "night_peak_rss_max": max(n["peak_rss"] for n in per_night),
        "parts_rebuilt": sum(n["rebuilt"] for n in per_night),
        "rows_rewritten": sum(n["rows_rewritten"] for n in per_night),
        "fixed_night": fixed_night, "files": len(sizes),
        "median_file_mb": round(statistics.median(sizes) / 2**20, 2) if sizes else 0,
        "table_gb": round(sum(sizes) / 2**30, 2), "parts": len(table.parts()),
        "current_rows": count, "duckdb_count_s": round(count_s, 3),
        "duckdb_count_image_id_s": round(count_id_s, 3),
        "duckdb_lookup_s": round(lookup_s, 3), "lookup_found": len(hit),
    }))


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if proc.returncode:
        sys.exit(f"{args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(large: dict, small: dict, key: str) -> float:
    return round(large["fixed_night"][key] / small["fixed_night"][key], 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size: 100k and 300k rows, 3 nights")
    ap.add_argument("--rows", default="1000000,10000000", help="table sizes, comma separated")
    ap.add_argument("--nights", type=int, default=30)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--fixed", type=int, default=10_000, help="new images of the same-size night")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where the tables go (default: a temp dir)")
    ap.add_argument("--new-pct", type=float, default=1.0, help="new images per night, %% of the lake")
    ap.add_argument("--changed-pct", type=float, default=0.1)
    ap.add_argument("--vanished-pct", type=float, default=0.01)
    ap.add_argument("--reuse", action="store_true", help="run more nights on tables built before in --dir")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "build":
            child_build(args.child[1], int(args.child[2]), int(args.child[3]), int(args.child[4]))
        else:
            out_dir, nights, dim, fixed, seed = args.child[1:6]
            child_nights(out_dir, int(nights), int(dim), int(fixed), int(seed),
                         tuple(float(x) for x in args.child[6:9]))
        return
    sizes = [100_000, 300_000] if args.quick else [int(x) for x in args.rows.split(",")]
    nights = 3 if args.quick else args.nights
    fixed = 1_000 if args.quick else args.fixed
    base = Path(args.dir or tempfile.mkdtemp(prefix="lakelens-scale-"))
    out = {}
    for n in sizes:
        target = base / f"t{n}"
        if not (args.reuse and (target / STATE).exists()):
            run_child("--child", "build", str(target), str(n), str(args.dim), str(args.seed))
        out[n] = run_child("--child", "nights", str(target), str(nights), str(args.dim), str(fixed),
                           str(args.seed), str(args.new_pct), str(args.changed_pct), str(args.vanished_pct))
        print(json.dumps(out[n]), flush=True)
    small, large = out[sizes[0]], out[sizes[-1]]
    print(json.dumps({
        "benchmark": "scale", "sizes": sizes, "nights": nights, "dim": args.dim,
        "night_pcts": [args.new_pct, args.changed_pct, args.vanished_pct],
        "build_s": {n: out[n]["build_s"] for n in sizes},
        "night_wall_s_median": {n: out[n]["night_wall_s_median"] for n in sizes},
        "night_peak_rss_max": {n: out[n]["night_peak_rss_max"] for n in sizes},
        "parts_rebuilt": {n: out[n]["parts_rebuilt"] for n in sizes},
        "bytes_ratio_amortised": {n: out[n]["bytes_ratio_amortised"] for n in sizes},
        "fixed_night_wall_ratio": ratio(large, small, "wall_s"),
        "fixed_night_rss_ratio": ratio(large, small, "peak_rss"),
        "files": {n: out[n]["files"] for n in sizes},
        "median_file_mb": {n: out[n]["median_file_mb"] for n in sizes},
        "duckdb_count_s": {n: out[n]["duckdb_count_s"] for n in sizes},
        "duckdb_count_image_id_s": {n: out[n]["duckdb_count_image_id_s"] for n in sizes},
        "duckdb_lookup_s": {n: out[n]["duckdb_lookup_s"] for n in sizes},
        "targets": {"bytes_ratio": "<= 2", "wall_ratio": "<= 1.5", "rss_ratio": "<= 1.2",
                    "median_file_mb_at_largest": ">= 32"},
    }))


if __name__ == "__main__":
    main()
