"""`lakelens annotate`: list -> read+decode (CPU tasks) -> one actor pool per model task
-> Parquet (results + errors) and a run record.

Every listed image ends as exactly one result row or one error row.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow.fs as pafs
import ray

from models import weights as W
from models.detection import input_sizes
from models.embedding import EMBED_ARCHS
from models.embedding import decode_sizes as embed_decode_sizes
from models.errors import LakelensError
from models.registry import ModelInfo, ensure_default_weights
from pipelines import version
from pipelines.config import AnnotateConfig, TaskConfig
from pipelines.schema import TASK_COLUMNS, results_schema
from pipelines.sink import AnnotationSink, output_fs, write_json
from pipelines.sources import Listing, image_id, list_sources
from pipelines.stages import ModelStage, read_decode

logger = logging.getLogger(__name__)

DECODE_BATCH = 16
MAX_INPUT_BLOCKS = 4096  # blocks of URIs; small runs get one per decode batch, so stages overlap


@dataclass(frozen=True)
class PoolPlan:
    """Resources of each model task's actor pool."""

    size: int
    num_cpus: float
    num_gpus: float
    torch_threads: int


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    out: str
    listed: int
    annotated: int
    errors: int
    skipped_non_images: int
    wall_s: float
    models: list[dict]

    @property
    def images_per_s(self) -> float:
        return self.listed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def lost(self) -> int:
        return self.listed - self.annotated - self.errors

    def describe(self) -> str:
        models = ", ".join(f"{m['task']}={m['arch']} ({m['weights']})" for m in self.models)
        text = (f"Run {self.run_id}: {self.listed} images listed, {self.annotated} annotated, "
                f"{self.errors} errors, {self.skipped_non_images} non-image files skipped, in "
                f"{self.wall_s:.1f} s ({self.images_per_s:.2f} images/s). Models: {models}. "
                f"Results in {self.out}/results, errors in {self.out}/errors, run record in "
                f"{self.out}/runs/{self.run_id}.json.")
        if self.lost:
            text += f" {self.lost} images have neither a result nor an error row: this is a bug."
        return text


def plan_pools(n_pools: int, cpus: float, gpus: float) -> PoolPlan:
    """Share the cluster between the model pools, leaving CPUs for read/decode/write tasks
    (actor pools holding every CPU starve those tasks and the job hangs)."""
    if gpus >= 1:
        share = gpus / n_pools
        size, num_gpus = (int(share), 1.0) if share >= 1 else (1, share)
        spare = max(cpus - 2, 0.0) / (size * n_pools)
        return PoolPlan(size, min(1.0, spare) if spare else 0.0, num_gpus, max(1, int(spare)))
    reserve = max(1.0, cpus // 4)
    per_pool = max(cpus - reserve, 0.25) / n_pools
    # Ray's CPU counts are for scheduling only: decode and write tasks come in short bursts,
    # so a model may run as many threads as its share of the cores, reserve included.
    threads = max(1, min(4, int(cpus // n_pools)))
    size = max(1, int(per_pool // threads))
    return PoolPlan(size, per_pool / size, 0.0, threads)


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def prepare_output(cfg: AnnotateConfig) -> None:
    """Refuse a DIR holding another run's results (unless overwrite) or one we cannot write."""
    fs, root = output_fs(cfg.out)
    existing = []
    for kind in ("results", "errors"):
        sel = pafs.FileSelector(f"{root}/{kind}", allow_not_found=True)
        existing += [i.path for i in fs.get_file_info(sel) if i.path.endswith(".parquet")]
    if existing and not cfg.overwrite:
        raise LakelensError(
            f"--out {cfg.out} already holds results of another run ({len(existing)} files); "
            "pass --overwrite to replace them or choose another directory")
    try:
        for kind in ("results", "errors", "runs"):
            fs.create_dir(f"{root}/{kind}", recursive=True)
        for path in existing:
            fs.delete_file(path)
        probe = f"{root}/runs/.write-probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as e:
        raise LakelensError(f"--out {cfg.out} is not writable: {e}") from e


def resolve_models(cfg: AnnotateConfig) -> list[ModelInfo]:
    """Check every task's weights in the driver, so a bad checkpoint or missing default
    weights fail at start with one line, not in an actor."""
    from models.detection import build_detector
    from models.embedding import build_embedder

    infos = []
    for task in cfg.tasks:
        arch, spec = cfg.arch_for(task), cfg.weights_for(task)
        if spec == W.DEFAULT:
            ensure_default_weights(task, arch, flag=f"--weights {task}=")
        if task == "embed":
            info = build_embedder(arch, weights=spec)[1]
        else:
            info = build_detector(arch, weights=spec, image_size=cfg.image_size)[1]
        infos.append(info)
    return infos


def decode_sizes(cfg: AnnotateConfig, infos: list[ModelInfo]) -> tuple[int | None, int | None]:
    """The largest (shorter, longer) side any model needs; decode no larger than that."""
    shorts, longs = [], []
    for info in infos:
        if info.task == "embed":
            s, lg = embed_decode_sizes(info.arch)
        else:
            s, lg = info.input_size or input_sizes(info.arch, cfg.image_size)
        shorts.append(s)
        longs.append(lg)
    return max(shorts), max(longs)


def task_configs(cfg: AnnotateConfig, infos: list[ModelInfo], plan: PoolPlan) -> list[TaskConfig]:
    return [TaskConfig(task=i.task, arch=i.arch, weights=i.weights, image_size=cfg.image_size,
                       score_threshold=cfg.score_threshold, batch_size=cfg.batch_size,
                       torch_threads=plan.torch_threads) for i in infos]


def build_dataset(cfg: AnnotateConfig, uris: list[str], infos: list[ModelInfo],
                  plan: PoolPlan) -> ray.data.Dataset:
    """The lazy pipeline; nothing runs until it is consumed."""
    items = [{"image_id": image_id(u), "uri": u} for u in uris]
    blocks = min(MAX_INPUT_BLOCKS, max(1, math.ceil(len(items) / min(DECODE_BATCH, cfg.batch_size))))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    short, long = decode_sizes(cfg, infos)
    # Decode in batches no larger than a model batch: each decoded block then feeds one model
    # call, so the stages work on different blocks at the same time.
    ds = ds.map_batches(read_decode, batch_size=min(DECODE_BATCH, cfg.batch_size),
                        batch_format="pyarrow",
                        fn_kwargs={"max_pixels": cfg.max_pixels, "short": short, "long": long})
    schema = results_schema(_embedding_dim(infos))
    tcfgs = task_configs(cfg, infos, plan)
    for n, tcfg in enumerate(tcfgs):
        ds = ds.map_batches(
            ModelStage, batch_size=cfg.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"cfg": tcfg,
                                   "column_type": schema.field(TASK_COLUMNS[tcfg.task]).type,
                                   "drop_pixels": n == len(tcfgs) - 1},
            compute=ray.data.ActorPoolStrategy(size=plan.size),
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)
    return ds


def _embedding_dim(infos: list[ModelInfo]) -> int:
    embed = next((i for i in infos if i.task == "embed"), None)
    return embed.embedding_dim if embed else EMBED_ARCHS["resnet50"].dim


def connect(cfg: AnnotateConfig) -> None:
    """Join `--address` (or RAY_ADDRESS, or the job's cluster); else start a local Ray."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise LakelensError(f"cannot connect to Ray at {address or 'a new local instance'}: {e}") from e


def _check_reachable(address: str) -> None:
    """Fail in seconds on a HOST:PORT nothing listens on (ray.init retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        return  # "auto", "local": Ray resolves those itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as e:
        raise LakelensError(f"cannot connect to Ray at {address}: {e.strerror or e}") from e


def run(cfg: AnnotateConfig) -> RunSummary:
    """Annotate every image of cfg.sources into cfg.out; returns the run's counts."""
    started = time.perf_counter()
    run_id = new_run_id()
    prepare_output(cfg)
    listing: Listing = list_sources(cfg.sources)
    uris = listing.uris[: cfg.limit] if cfg.limit else listing.uris
    if not uris:
        raise LakelensError(
            f"no images found in {', '.join(cfg.sources)} ({listing.skipped} non-image files "
            f"skipped; extensions: jpg, jpeg, png, gif, bmp, tif, tiff, webp)")
    infos = resolve_models(cfg)
    connect(cfg)
    res = ray.cluster_resources()
    plan = plan_pools(len(infos), res.get("CPU", 1.0), res.get("GPU", 0.0))
    logger.info("run %s: %d images, tasks %s, %d actor(s) per task (%.2f CPU, %.2f GPU each)",
                run_id, len(uris), ",".join(cfg.tasks), plan.size, plan.num_cpus, plan.num_gpus)
    sink = AnnotationSink(cfg.out, run_id=run_id, models=infos,
                          embedding_dim=_embedding_dim(infos), rows_per_file=cfg.rows_per_file)
    build_dataset(cfg, uris, infos, plan).write_datasink(sink)
    wall = time.perf_counter() - started
    summary = RunSummary(run_id=run_id, out=cfg.out, listed=len(uris), annotated=sink.results,
                         errors=sink.errors, skipped_non_images=listing.skipped, wall_s=wall,
                         models=sink.models)
    record = {"run_id": run_id, "lakelens_version": version(),
              "config": dataclasses.asdict(cfg), "plan": dataclasses.asdict(plan),
              "models": [dataclasses.asdict(i) | {"labels": len(i.labels)} for i in infos],
              "counts": {"listed": summary.listed, "annotated": summary.annotated,
                         "errors": summary.errors, "skipped_non_images": listing.skipped,
                         "lost": summary.lost},
              "wall_s": round(wall, 3), "images_per_s": round(summary.images_per_s, 3),
              "files": sorted(sink.files), "finished_at": datetime.now(UTC).isoformat()}
    fs, root = output_fs(cfg.out)
    write_json(fs, f"{root}/runs/{run_id}.json", record)
    if summary.lost:
        logger.error("%d images have neither a result nor an error row", summary.lost)
    return summary
