"""GPU placement on a simulated cluster: images/s and actors per GPU, 1-4 tasks, 1-7 GPUs.

Each case starts a `ray.cluster_utils.Cluster` (a CPU head, one 1-CPU node labelled
`lakelens/role=model` per two logical GPUs, one 1-CPU `decode` node; the models fall back
to CPU, so images/s measure placement and overlap, not GPU speed) and annotates the same
small lake with `tiny` models:

- lakelens: one fused actor per GPU running every asked task (its run record says where
  each actor ran and how busy it was);
- baseline, measured in the same cluster: the plan lakelens had before, which is also what
  Ray's docs suggest for several models: one actor pool per task, each actor asking
  `num_gpus = GPUs / tasks` (a fraction when there are fewer GPUs than tasks).

Per case: wall time, images/s, actors per GPU, and whether every asked task had an actor
running at once (a fractional plan on too few GPUs leaves some waiting). The last stdout
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

TASKS = ("detect", "segment", "pose", "embed")
TINY = {"detect": "fasterrcnn_tiny", "segment": "maskrcnn_tiny", "pose": "keypointrcnn_tiny",
        "embed": "tiny"}


def write_lake(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def start_cluster(gpus: int):
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.cluster.local import ensure_token

    ensure_token()  # token auth on, as lakelens runs everywhere
    os.environ.pop("RAY_ADDRESS", None)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for i in range(0, gpus, 2):
        c.add_node(num_cpus=1, num_gpus=min(2, gpus - i), labels={"lakelens/role": "model"})
    c.add_node(num_cpus=1, labels={"lakelens/role": "decode"})
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return c


def lakelens_case(lake: Path, out: Path, tasks: tuple[str, ...]) -> dict:
    from pipelines.annotate import run
    from pipelines.config import AnnotateConfig

    t = time.perf_counter()
    s = run(AnnotateConfig(sources=(str(lake),), out=str(out), tasks=tasks,
                           weights=dict.fromkeys(tasks, "random"), archs={k: TINY[k] for k in tasks},
                           batch_size=2, chunk_size=16, score_threshold=0.0))
    wall = time.perf_counter() - t
    record = json.loads((out / "runs" / f"{s.run_id}.json").read_text())
    held = {(a["node"], a["gpus"]) for a in record["actors"]}
    return {"wall_s": round(wall, 2), "images_per_s": round(s.annotated / wall, 2),
            "actors": len(record["actors"]), "gpus_holding_an_actor": len(held),
            "every_task_running": all(all(v["busy_s"] > 0 for v in a["tasks"].values())
                                      for a in record["actors"] if a["tasks"][tasks[0]]["images"])}


def baseline_case(lake: Path, tasks: tuple[str, ...], gpus: int, timeout: float) -> dict:
    """One pool per task, num_gpus = GPUs / tasks each: written plainly with Ray Data, the
    same read/decode and model stages as lakelens."""
    import pyarrow as pa
    import ray

    from pipelines.annotate.read import read_decode
    from pipelines.annotate.stages import FusedStage
    from pipelines.config import TaskConfig
    from pipelines.schema import TASK_COLUMNS, TASK_TYPES

    share = gpus / len(tasks)
    size, num_gpus = (int(share), 1.0) if share >= 1 else (1, share)
    uris = sorted(str(p) for p in lake.iterdir())
    ds = ray.data.from_arrow(pa.table({"uri": uris})).map_batches(
        read_decode, batch_size=2, batch_format="pyarrow", num_cpus=0.25,
        fn_kwargs={"max_pixels": 10**8, "short": 128, "long": 192})
    for n, task in enumerate(tasks):
        cfg = TaskConfig(task=task, arch=TINY[task], weights="random", batch_size=2, score_threshold=0.0)
        kwargs = {"cfgs": [cfg], "column_types": [TASK_TYPES[TASK_COLUMNS[task]]],
                  "drop_pixels": n == len(tasks) - 1}
        ds = ds.map_batches(FusedStage, batch_size=2, batch_format="pyarrow", fn_constructor_kwargs=kwargs,
                            compute=ray.data.ActorPoolStrategy(size=size), num_cpus=0.1, num_gpus=num_gpus)
    per_gpu = math.floor(1 / num_gpus + 1e-9) if num_gpus < 1 else 1
    placeable = min(size * len(tasks), gpus * per_gpu)
    figures = {"actors": size * len(tasks), "num_gpus_each": round(num_gpus, 3),
               "actors_placeable_at_once": placeable}
    box: dict = {}

    def consume() -> None:
        box["rows"] = sum(b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))

    t = time.perf_counter()
    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(timeout)
    wall = time.perf_counter() - t
    if "rows" not in box:  # some pools never got their GPU share: the pipeline waits forever
        return {**figures, "finished": False, "wall_s": None, "images_per_s": None}
    return {**figures, "finished": True, "wall_s": round(wall, 2),
            "images_per_s": round(box["rows"] / wall, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--gpus", default="1,2,3,7", help="logical GPU counts, comma-separated")
    p.add_argument("--tasks", default="1,2,3,4", help="numbers of tasks, comma-separated")
    p.add_argument("--baseline-timeout", type=float, default=120,
                   help="seconds before a baseline run is called stuck")
    p.add_argument("--quick", action="store_true", help="CI sizes: 12 images, 3 GPUs, 1 and 4 tasks")
    args = p.parse_args()
    if args.quick:
        args.images, args.gpus, args.tasks = 12, "3", "1,4"
    gpu_counts = [int(g) for g in args.gpus.split(",")]
    task_counts = [int(t) for t in args.tasks.split(",")]
    import ray

    cases = []
    with tempfile.TemporaryDirectory(prefix="lakelens-placement-") as tmp:
        lake = Path(tmp) / "lake"
        write_lake(lake, args.images)
        for gpus in gpu_counts:
            cluster = start_cluster(gpus)
            try:
                ours = {n: lakelens_case(lake, Path(tmp) / f"out-{gpus}-{n}", TASKS[:n]) for n in task_counts}
                for n in task_counts:
                    base = baseline_case(lake, TASKS[:n], gpus, timeout=args.baseline_timeout)
                    cases.append({"gpus": gpus, "tasks": n, "lakelens": ours[n], "baseline": base})
                    print(f"{gpus} GPU(s), {n} task(s): lakelens {ours[n]['images_per_s']} images/s, "
                          f"{ours[n]['actors']} actors on {ours[n]['gpus_holding_an_actor']} GPUs; "
                          f"baseline {base['images_per_s']} images/s, {base['actors']} actors x "
                          f"{base['num_gpus_each']} GPU, {base['actors_placeable_at_once']} placeable",
                          flush=True)
                    if not base["finished"]:  # its pending actors hold the cluster: start afresh
                        ray.shutdown()
                        cluster.shutdown()
                        cluster = start_cluster(gpus)
            finally:
                ray.shutdown()
                cluster.shutdown()
    every_gpu = all(c["lakelens"]["gpus_holding_an_actor"] == c["gpus"] for c in cases)
    stuck = [f"{c['gpus']}gpu/{c['tasks']}task" for c in cases if not c["baseline"]["finished"]]
    print(json.dumps({"bench": "placement", "images": args.images, "every_gpu_holds_an_actor": every_gpu,
                      "baseline_stuck": stuck, "cases": cases}))


if __name__ == "__main__":
    main()
