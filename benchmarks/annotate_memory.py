"""Annotate's memory as the lake grows: driver and worker peak RSS at 8k images against 1k,
and object-store spilling, in the default configuration.

Two lakes of 640x480 JPEGs (default 1,000 and 8,000) are annotated with `--tasks embed`
(resnet18, seeded random weights), each in a fresh process that starts its own local
Ray. While a run goes, the RSS of the driver and of every Ray worker process (`ray::*`)
is sampled every 50 ms; afterwards the object store's own counters say how much was
spilled to disk. Targets: driver and worker peak RSS at 8k <= 1.2x at 1k; nothing spilled
(workers judged by private memory, RSS less shared pages: see Sampler).
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit  # noqa: E402


class Sampler:
    """Peak RSS of this process and of the largest Ray worker process, and of all the
    workers together, sampled every 50 ms. For workers also their private memory (RSS less
    shared pages): a worker's RSS counts the object store's shared pages it has read, which
    grows with the blocks it handled up to the store's size without being its own."""

    def __init__(self) -> None:
        import psutil

        self.psutil, self.me = psutil, psutil.Process()
        self.driver = self.worker = self.workers_total = self.worker_private = 0
        self.worker_name = ""
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.driver = max(self.driver, self.me.memory_info().rss)
            total = 0
            for p in self.psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                mem = p.info["memory_info"]
                if cmd.startswith("ray::") and mem is not None:
                    total += mem.rss
                    self.worker_private = max(self.worker_private, mem.rss - mem.shared)
                    if mem.rss > self.worker:
                        self.worker, self.worker_name = mem.rss, cmd.split()[0]
            self.workers_total = max(self.workers_total, total)
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


def spilled_bytes() -> int | None:
    """Bytes the object store spilled to disk since Ray started (None if unknown)."""
    import ray

    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
        return int(reply.store_stats.spilled_bytes_total)
    except Exception:  # an internal API: report unknown rather than fail the figures
        return None


def child(lake: str, out: str) -> None:
    import logging

    import ray

    from pipelines import annotate
    from pipelines.cluster.local import start_local_ray
    from pipelines.config import AnnotateConfig

    logging.basicConfig(level=logging.WARNING)
    start_local_ray(None)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = AnnotateConfig(sources=(lake,), out=out, tasks=("embed",), weights={"embed": "random"},
                         archs={"embed": "resnet18"})
    t = time.perf_counter()
    with Sampler() as s:
        summary = annotate.run(cfg)
    wall = time.perf_counter() - t
    print(json.dumps({"images": summary.annotated, "errors": summary.errors, "wall_s": round(wall, 1),
                      "driver_peak_mib": round(s.driver / 2**20, 1),
                      "worker_peak_mib": round(s.worker / 2**20, 1), "worker_peak_process": s.worker_name,
                      "workers_total_peak_mib": round(s.workers_total / 2**20, 1),
                      "worker_private_peak_mib": round(s.worker_private / 2**20, 1),
                      "spilled_bytes": spilled_bytes()}))
    ray.shutdown()


def measure(lake: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(lake), str(out)],
                          stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        sys.exit(f"the run over {lake} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--large", type=int, default=8000)
    p.add_argument("--quick", action="store_true", help="CI sizes: 200 and 1,600 images")
    p.add_argument("--child", nargs=2, metavar=("LAKE", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.quick:
        args.small, args.large = 200, 1600
    from pipelines.synth import write_lake

    with tempfile.TemporaryDirectory(prefix="lakelens-memory-") as tmp:
        root = Path(tmp)
        runs = {}
        for name, n in (("small", args.small), ("large", args.large)):
            write_lake(root / f"lake-{name}", images=n, width=640, height=480, seed=n)
            runs[name] = measure(root / f"lake-{name}" / "images", root / f"out-{name}")
            print(f"{n} images: {runs[name]}", flush=True)
    small, large = runs["small"], runs["large"]
    result = {
        "bench": "annotate_memory", "quick": args.quick, "task": "embed", "arch": "resnet18",
        "small": args.small, "large": args.large, "runs": runs,
        "driver_ratio": round(large["driver_peak_mib"] / small["driver_peak_mib"], 3),
        "worker_ratio": round(large["worker_peak_mib"] / small["worker_peak_mib"], 3),
        "worker_private_ratio": round(large["worker_private_peak_mib"] / small["worker_private_peak_mib"], 3),
        "spilled_bytes_large": large["spilled_bytes"],
    }
    result["targets"] = {"driver_ratio<=1.2": result["driver_ratio"] <= 1.2,
                         "worker_private_ratio<=1.2": result["worker_private_ratio"] <= 1.2,
                         "no_spilling": large["spilled_bytes"] == 0}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
