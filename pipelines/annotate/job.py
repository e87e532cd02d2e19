"""`lakelens annotate`: plan -> lock (its epoch committed into the table) -> list + diff
against the table -> read+decode (CPU tasks) -> one actor pool per model task -> the commit
loop (one append to the log per chunk) -> upkeep -> index -> near-duplicate edges -> run record
(pipelines.annotate.report).

Incremental by default: only new and changed images (and transient errors of earlier
runs) are annotated. Every listed image ends as exactly one current row, a result or an
error, through task retries, worker deaths, driver crashes and reruns:
- the driver is the only writer and commits a chunk at a time (pipelines.lake.table);
- a rerun of a crashed run finds its committed chunks unchanged in the diff;
- images whose blocks were lost to dead workers are found after the pass
  (diff.find_missing), tried again one per block, and what still kills its worker ends
  as a WorkerCrashed error row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pyarrow.fs as pafs
import ray
from ray.util.annotations import RayDeprecationWarning

from models import weights as W
from models.detection import input_sizes
from models.embedding import EMBED_ARCHS
from models.embedding import decode_sizes as embed_decode_sizes
from models.errors import LakelensError
from models.registry import ModelInfo, ensure_default_weights
from pipelines.annotate.commit import Committer, process_age
from pipelines.annotate.connect import connect
from pipelines.annotate.read import read_decode
from pipelines.annotate.report import RunSummary, actor_stats, log_actors, pool_steady_rate, write_record
from pipelines.annotate.stages import FusedStage
from pipelines.cluster.placement import (
    READ_CPUS,
    PoolPlan,
    cluster_view,
    current_plan,
    role_selector,
)
from pipelines.cluster.weights import joined_cluster, ship_published
from pipelines.config import AnnotateConfig, TaskConfig
from pipelines.lake import diff as D
from pipelines.lake.lock import acquire
from pipelines.lake.sources import is_remote, plan_sources
from pipelines.lake.table import (
    LakeTable,
    NeedsMigration,
    create_or_open,
    location,
    open_table,
    output_fs,
    save_meta,
)
from pipelines.lake.upkeep import migrate_locked, run_upkeep
from pipelines.schema import TASK_COLUMNS, TASK_TYPES

logger = logging.getLogger(__name__)

DECODE_BATCH = 16
# Ray Data retries a task whose worker died forever by default, so one image that kills
# its worker would hang the run. Bounded here: a read/decode task or a model call is
# retried TASK_RETRIES times, then its block is set aside and isolated (_recover_lost).
# Model actors keep Ray Data's restart policy (restarted as often as they die); their
# deaths are bounded by the task retries of the blocks that kill them.
TASK_RETRIES = 2
STOP_WAIT_S = 30.0  # an early pass told to stop: how long the driver waits for it
ACTOR_START_S = 600  # model actors that cannot all start by then: a plan the cluster cannot place


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def resolve_models(cfg: AnnotateConfig) -> list[ModelInfo]:
    """Check every task's weights in the driver, so a bad checkpoint or missing default
    weights fail at start with one line, not in an actor."""
    from models.detection import build_detector
    from models.embedding import build_embedder
    from models.semantic import build_semantic

    infos = []
    for task in cfg.tasks:
        arch, spec = cfg.arch_for(task), cfg.weights_for(task)
        if spec == W.DEFAULT:
            ensure_default_weights(task, arch, flag=f"--weights {task}=")
        if task == "embed":
            info = build_embedder(arch, weights=spec)[1]
        elif task == "semantic":
            info = build_semantic(arch, weights=spec, image_size=cfg.image_size)[1]
        else:
            info = build_detector(arch, weights=spec, image_size=cfg.image_size)[1]
        infos.append(info)
    return infos


def ship_default_weights(cfg: AnnotateConfig, infos: list[ModelInfo]) -> dict[str, ray.ObjectRef] | None:
    """torchvision's published weights the driver resolved, for model actors on other
    machines (their nodes need no internet, nor a shared cache)."""
    from models.registry import published_url

    urls = {published_url(i.task, i.arch) for i in infos if cfg.weights_for(i.task) == W.DEFAULT}
    urls.discard(None)
    return ship_published(urls, joined=joined_cluster(cfg.address))


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


def _embedding_dim(infos: list[ModelInfo]) -> int:
    embed = next((i for i in infos if i.task == "embed"), None)
    return embed.embedding_dim if embed else EMBED_ARCHS["resnet50"].dim


def _absolute(spec: str) -> str:
    """A local checkpoint path made absolute, so an index can find the embedder later."""
    if spec in ("default", "random") or is_remote(spec):
        return spec
    return os.path.abspath(spec.removeprefix("file://"))


def record_models(table: LakeTable, infos: list[ModelInfo], full: bool) -> None:
    """Write this run's models into DIR/lakelens.json; refuse an embedder of another dim
    (its vectors could not share an index), and a different embedder unless --full."""
    meta = table.meta
    for info in infos:
        if info.task != "embed":
            continue
        old = meta.get("models", {}).get("embed")
        if meta.get("embedding_dim") not in (None, info.embedding_dim):
            raise LakelensError(
                f"{table.out} holds embeddings of dim {meta['embedding_dim']}; this run's embedder "
                f"{info.arch} makes dim {info.embedding_dim}: use another --out")
        if old and old["weights_id"] != info.weights_id and not full:
            raise LakelensError(
                f"{table.out} was embedded with {old['arch']} ({old['weights_id']}); this run asks "
                f"{info.arch} ({info.weights_id}): pass --full to re-embed every image, or use "
                "another --out")
        meta["embedding_dim"] = info.embedding_dim
    models = dict(meta.get("models", {}))
    for info in infos:
        models[info.task] = {"arch": info.arch, "weights_id": info.weights_id,
                             "spec": _absolute(info.weights), "labels": list(info.labels),
                             "keypoint_names": list(info.keypoint_names),
                             "embedding_dim": info.embedding_dim}
    meta["models"] = models
    save_meta(table)


def build_dataset(cfg: AnnotateConfig, todo: ray.data.Dataset, infos: list[ModelInfo],
                  plan: PoolPlan, *, rows_per_block: int, stats_dir: str | None = None,
                  weights_files: dict[str, ray.ObjectRef] | None = None) -> ray.data.Dataset:
    """The lazy pipeline over the rows to annotate; nothing runs until it is consumed.
    Model actors write what they did under `stats_dir` (see ActorStats); with role labels
    on the cluster, decode runs on `decode` nodes and models on `model` nodes."""
    short, long = decode_sizes(cfg, infos)
    view = cluster_view()
    # Blocks of todo rows (diff.TODO_GROUP) are decoded rows_per_block images per batch; a
    # read task's output streams on in blocks of Ray Data's target size.
    ds = todo
    with warnings.catch_warnings():
        # Ray 2.60 names no parameter for task retries; its ray_remote_args still take them.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        ds = ds.map_batches(read_decode, batch_size=rows_per_block, batch_format="pyarrow",
                            fn_kwargs={"max_pixels": cfg.max_pixels, "short": short, "long": long,
                                       "max_bytes": cfg.max_image_bytes},
                            num_cpus=READ_CPUS, max_retries=TASK_RETRIES,
                            label_selector=role_selector(view, "decode"))
        tcfgs = task_configs(cfg, infos, plan)
        # Fused: one pool, every task in each actor (a single task: one pool either way).
        groups = [tcfgs] if plan.fused else [[t] for t in tcfgs]
        for n, group in enumerate(groups):
            ds = ds.map_batches(
                FusedStage, batch_size=cfg.batch_size, batch_format="pyarrow",
                fn_constructor_kwargs={
                    "cfgs": group, "column_types": [TASK_TYPES[TASK_COLUMNS[t.task]] for t in group],
                    "drop_pixels": n == len(groups) - 1, "stats_dir": stats_dir,
                    "weights_files": weights_files},
                compute=ray.data.ActorPoolStrategy(min_size=plan.size,
                                                   max_size=plan.max_size or plan.size),
                num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_task_retries=TASK_RETRIES,
                label_selector=role_selector(view, "model"))
    return ds


@contextlib.contextmanager
def _tolerating_lost_blocks():
    """Datasets created inside: a block whose tasks kept failing (a worker that died on it
    every time, a node that left) is set aside, not fatal; find_missing finds its images.
    Model actors all start before work flows (every GPU gets its actor), and a plan the
    cluster cannot place fails after ACTOR_START_S instead of waiting for ever.
    (A Dataset keeps the DataContext of its creation, so this wraps building it.)"""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.max_errored_blocks, ctx.wait_for_min_actors_s
    ctx.max_errored_blocks, ctx.wait_for_min_actors_s = -1, ACTOR_START_S
    try:
        yield
    finally:
        ctx.max_errored_blocks, ctx.wait_for_min_actors_s = saved


def _consume(ds: ray.data.Dataset, committer: Committer) -> None:
    """Stream the pipeline's rows into the committer, a chunk per commit."""
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            committer.add(batch)
    except ray.exceptions.GetTimeoutError as e:
        raise LakelensError(
            f"the model actors did not all start within {ACTOR_START_S} s: the cluster has not "
            f"the resources they ask (available now: {ray.available_resources()}); what was "
            "committed stays committed") from e
    committer.flush()


class EarlyPass:
    """The annotate pipeline started before the diff: its model actors start (a worker
    process, torch, the model build: seconds each) while the listing and the diff run. Its
    input tasks wait for release(); a thread streams its rows into the committer."""

    def __init__(self, cfg: AnnotateConfig, infos: list[ModelInfo], plan: PoolPlan, staging: str,
                 committer: Committer, shipped: dict[str, ray.ObjectRef] | None, *, slots: int):
        self.staging = staging
        with _tolerating_lost_blocks():  # a Dataset keeps the DataContext of its creation
            todo = D.awaited_todo_dataset(staging, "todo", slots=slots, num_cpus=READ_CPUS)
            if cfg.limit:
                todo = todo.limit(cfg.limit)
            ds = build_dataset(cfg, todo, infos, plan, rows_per_block=min(DECODE_BATCH, cfg.batch_size),
                               stats_dir=f"{staging}/actors", weights_files=shipped)
        self.error: BaseException | None = None
        self.released = False

        def consume() -> None:
            try:
                _consume(ds, committer)
            except BaseException as e:  # noqa: BLE001 - raised again by join(), in the driver's thread
                self.error = e

        # A daemon: an interrupted driver must not wait for it (what it committed stays).
        self.thread = threading.Thread(target=consume, name="lakelens-pass", daemon=True)
        self.thread.start()

    def release(self, go: bool = True) -> None:
        if not self.released:
            D.release_todo(self.staging, "todo", go=go)
            self.released = True

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """No rows to annotate after all (or the run failed before the diff ended): its
        input ends with no rows. Waits a little for it; a pass still starting its actors
        then is left to the process's exit (it can commit nothing)."""
        self.release(go=False)
        self.thread.join(timeout=STOP_WAIT_S)


def _room_to_start_early(plan: PoolPlan, pools: int) -> bool:
    """Whether the pass may start before the diff: one node (a local Ray) with the actors'
    resources free now and a whole CPU left beside them for the listing's and the diff's
    tasks (which the pass waits for). On a cluster of several nodes the actors could take
    every node's last whole CPU (two 0.75-CPU actors on each 2-CPU node), and an
    autoscaling one would add nodes for a night that may have nothing new: there, and on a
    1-CPU machine, the pass starts after the diff."""
    if len([n for n in ray.nodes() if n["Alive"]]) != 1:
        return False
    pools = 1 if plan.fused else pools
    free = ray.available_resources()
    return (free.get("CPU", 0.0) - plan.size * pools * plan.num_cpus >= 1.0
            and free.get("GPU", 0.0) >= plan.size * pools * plan.num_gpus)


def run(cfg: AnnotateConfig) -> RunSummary:
    """Bring cfg.out's table up to date with cfg.sources; returns the run's counts."""
    started = time.perf_counter()
    run_id = new_run_id()
    plan_src = plan_sources(cfg.sources)
    try:
        table = create_or_open(cfg.out, buckets=cfg.buckets)
        legacy = False
    except NeedsMigration:
        table, legacy = None, True
    with acquire(cfg.out, run_id, lease_s=cfg.lease_s) as lock:
        # Every task's weights are checked (a bad checkpoint or missing default weights is
        # one line at start, not an actor failure) while Ray's processes start.
        with ThreadPoolExecutor(1, thread_name_prefix="lakelens-models") as pool:
            resolving = pool.submit(resolve_models, cfg)
            connect(cfg)
            timeline = {"ray_ready": round(process_age(), 2)}
            infos = resolving.result()
            timeline["models_checked"] = round(process_age(), 2)
        epoch = lock.epoch
        if legacy:  # a schema 2/3 table: migrated in place, under the lock, before anything
            epoch = migrate_locked(cfg.out, epoch=epoch, run_id=run_id)["epoch"]
            table = open_table(cfg.out)
        else:  # the lock's epoch lands in the table at once: an owner it replaced is fenced
            epoch = table.fence(epoch, run_id=run_id)
        fs, root = output_fs(cfg.out)
        staging_root = f"{root}/_lakelens/staging"
        for old in fs.get_file_info(pafs.FileSelector(staging_root, allow_not_found=True)):
            fs.delete_dir(old.path)  # left by a crashed run; under the lock nobody uses them
        staging = location(cfg.out, "_lakelens", "staging", run_id)
        try:
            summary = _run_locked(cfg, run_id, table, epoch, infos, plan_src, staging, started, lock,
                                  timeline)
        finally:
            try:
                fs.delete_dir(f"{staging_root}/{run_id}")
            except (FileNotFoundError, OSError):
                pass
    return summary


def _run_locked(cfg: AnnotateConfig, run_id: str, table: LakeTable, epoch: int,
                infos: list[ModelInfo], plan_src, staging: str, started: float, lock,
                timeline: dict[str, float]) -> RunSummary:
    base_version = table.version

    def still_owner() -> None:
        """Between phases: a run whose lease was taken over (or fenced off by a newer run)
        stops here, in one line, even when it has no chunk left to commit (its upkeep,
        index sync and record would otherwise run beside its successor's)."""
        lock.check()
        table.log.update_incremental()
        table.check_fence(epoch)

    parts = table.parts()
    counts, skipped = D.DiffCounts(), {}
    committer = Committer(table, run_id, epoch, infos, cfg.chunk_size, timeline=timeline)
    early = None
    try:
        plan, shipped = current_plan(len(infos), cfg.max_gpus), None
        if _room_to_start_early(plan, len(infos)):
            shipped = ship_default_weights(cfg, infos)
            # Each input task holds a worker process while it waits: one per 8 CPUs (a task
            # reads a todo row group in milliseconds; the decode tasks after it are many).
            slots = max(1, min(len(parts), int(cluster_view().cpus // 8)))
            early = EarlyPass(cfg, infos, plan, staging, committer, shipped, slots=slots)
            committer.mark("pass_started")
        counts, skipped = _list_and_diff(cfg, run_id, table, infos, plan_src, staging, parts)
        committer.mark("diffed")
        still_owner()
        record_models(table, infos, cfg.full)
        crashed = _annotate(cfg, run_id, table, infos, staging, counts, committer, parts=parts,
                            since=base_version, plan=plan, shipped=shipped, early=early)
        if cfg.prune and counts.vanished:
            gone = D.read_bucket_files(staging, "vanished")
            if gone is not None:
                committer.close_vanished(gone)
        still_owner()
        upkeep = run_upkeep(table)
        committer.mark("upkeep_done")
        actors = actor_stats(f"{staging}/actors") if counts.todo else []
        born = time.time() - process_age()
        for key, name in (("ready_at", "actors_ready"), ("first_batch_at", "first_batch")):
            stamps = [a[key] for a in actors if a.get(key)]
            if stamps:
                at = max(stamps) if key == "ready_at" else min(stamps)
                committer.timeline[name] = round(at - born, 2)
        summary = _summary(cfg, run_id, table, counts, skipped, committer, crashed, actors, infos,
                           wall=time.perf_counter() - started)
        log_actors(run_id, actors, summary.wall_s)
        if cfg.index:  # every run: an index left behind by an earlier failure catches up
            from pipelines import dedup, indexing

            still_owner()
            index = indexing.sync(cfg.index, cfg.out)
            # then the near-duplicate edges of the images it gained (catching up the same way)
            found = dedup.nightly(cfg.out, cfg.index, run_id=run_id)
            index = {**index, "summary": f"{index['summary']}; {dedup.describe_nightly(found)}",
                     "dedup": found}
            summary = dataclasses.replace(summary, index=index)
            committer.mark("index_synced")
        still_owner()
    except BaseException as e:  # the record of a failed run: what it committed before it failed
        if early is not None and not isinstance(e, KeyboardInterrupt):
            early.stop()  # its input tasks end with no rows (it is a daemon: Ctrl-C does not wait)
        _record_failure(cfg, run_id, table, counts, skipped, committer, infos, base_version,
                        started, e)
        raise
    write_record(cfg, summary, infos, committer, base_version=base_version, actors=actors, upkeep=upkeep)
    return summary


def _record_failure(cfg: AnnotateConfig, run_id: str, table: LakeTable, counts: D.DiffCounts,
                    skipped: dict[str, int], committer: Committer, infos: list[ModelInfo],
                    base_version: int, started: float, error: BaseException) -> None:
    """DIR/runs/RUN_ID.json for a run that failed: its counts and commits so far and the
    error's first line. Never masks the run's own error."""
    try:
        table.refresh()
        summary = _summary(cfg, run_id, table, counts, skipped, committer, 0, [], infos,
                           wall=time.perf_counter() - started)
        text = str(error).strip().splitlines()
        write_record(cfg, summary, infos, committer, base_version=base_version, actors=[], upkeep={},
                     failed=f"{type(error).__name__}: {text[0][:500] if text else ''}".rstrip(": "))
        logger.info("run %s failed after %d commits; its record is %s/runs/%s.json", run_id,
                    committer.seq, cfg.out, run_id)
    except Exception:  # noqa: BLE001 - the run's own error is the one to raise
        logger.warning("run %s: could not write the record of the failed run", run_id, exc_info=True)


def _list_and_diff(cfg: AnnotateConfig, run_id: str, table: LakeTable, infos: list[ModelInfo], plan_src,
                   staging: str, parts: list[str]) -> tuple[D.DiffCounts, dict[str, int]]:
    """List the sources into per-part staging, then classify every image against the table."""
    skipped = D.stage_listing(D.listing_dataset(plan_src, staging), staging, parts)
    embed = next((i for i in infos if i.task == "embed"), None)
    counts = D.diff(cfg.out, staging, parts, full=cfg.full, prune=cfg.prune,
                    embed_weights=embed.weights_id if embed else None)
    if counts.unlisted_dirs:
        logger.warning("run %s: %d directories could not be listed (their %d images are kept, not "
                       "taken for vanished): %s", run_id, len(counts.unlisted_dirs), counts.unlistable,
                       ", ".join(counts.unlisted_dirs[:5]))
    if counts.listed == 0:
        kinds = ", ".join(f"{n} {e}" for e, n in sorted(skipped.items())) or "none"
        raise LakelensError(f"no images found in {', '.join(cfg.sources)} (non-image files "
                            f"skipped: {kinds})")
    logger.info("run %s: %d listed: %d new, %d changed, %d earlier errors to retry, %d made by "
                "another embedder, %d unchanged, %d vanished", run_id, counts.listed, counts.new,
                counts.changed, counts.retry, counts.stale, counts.unchanged, counts.vanished)
    return counts, skipped


def _annotate(cfg: AnnotateConfig, run_id: str, table: LakeTable, infos: list[ModelInfo], staging: str,
              counts: D.DiffCounts, committer: Committer, *, parts: list[str], since: int,
              plan: PoolPlan, shipped: dict[str, ray.ObjectRef] | None,
              early: EarlyPass | None = None) -> int:
    """The pipeline over what the diff staged (started early, or now), into the commit
    loop; then what was lost to dead workers, once more. Returns how many images crashed
    their worker every time."""
    if not counts.todo:
        if early is not None:
            early.stop()
        return 0
    logger.info("run %s: annotating %d images, tasks %s, %s (%.2f CPU, %.2f GPU each)%s",
                run_id, min(counts.todo, cfg.limit or counts.todo), ",".join(cfg.tasks),
                plan.pools, plan.num_cpus, plan.num_gpus,
                "; model actors started during the diff" if early else "")
    if early is not None:
        early.release()
        early.join()
    else:
        shipped = ship_default_weights(cfg, infos)
        committer.mark("pass_started")
        rows = min(DECODE_BATCH, cfg.batch_size)
        with _tolerating_lost_blocks():
            todo = D.todo_dataset(staging, "todo", num_cpus=READ_CPUS)
            if cfg.limit:
                todo = todo.limit(cfg.limit)
            _consume(build_dataset(cfg, todo, infos, plan, rows_per_block=rows,
                                   stats_dir=f"{staging}/actors", weights_files=shipped), committer)
    if committer.annotated + committer.errors >= counts.todo:
        return 0
    return _recover_lost(cfg, run_id, table, staging, infos, plan, committer, shipped, parts=parts,
                         since=since)


def _summary(cfg: AnnotateConfig, run_id: str, table: LakeTable, counts: D.DiffCounts,
             skipped: dict[str, int], committer: Committer, crashed: int, actors: list[dict],
             infos: list[ModelInfo], *, wall: float) -> RunSummary:
    tried = committer.annotated + committer.errors
    exceeded = bool(committer.errors) and committer.errors / max(tried, 1) > cfg.max_error_rate and (
        tried >= 100 or committer.errors == tried)
    return RunSummary(
        run_id=run_id, out=cfg.out, listed=counts.listed, new=counts.new, changed=counts.changed,
        unchanged=counts.unchanged, vanished=counts.vanished, retried=counts.retry,
        annotated=committer.annotated, errors=committer.errors, crashed=crashed,
        read_retries=committer.read_retries, skipped=skipped, wall_s=wall, stale=counts.stale,
        unlistable=counts.unlistable, unlisted_dirs=counts.unlisted_dirs,
        table_version=table.version, top_errors=committer.top_errors(),
        error_rate_exceeded=exceeded, max_error_rate=cfg.max_error_rate,
        steady_images_per_s=pool_steady_rate(actors, infos[-1].task)
        or committer.throughput()["steady_images_per_s"])


def _recover_lost(cfg: AnnotateConfig, run_id: str, table: LakeTable, staging: str,
                  infos: list[ModelInfo], plan: PoolPlan, committer: Committer,
                  shipped: dict[str, ray.ObjectRef] | None = None, *, parts: list[str],
                  since: int) -> int:
    """Images the pass did not commit (their blocks failed every retry): once more, one
    image per block; what is still missing then crashed its worker every time."""
    if cfg.limit:
        return 0  # a --limit run leaves the rest for later on purpose
    table.refresh()
    lost = D.find_missing(cfg.out, staging, parts, run_id=run_id, since=since, source="todo",
                          dest="lost")
    if not lost:
        return 0
    logger.warning("%d images were lost to failed workers; trying them again one at a time", lost)
    plan = current_plan(len(infos), cfg.max_gpus)
    with _tolerating_lost_blocks():
        again = D.todo_dataset(staging, "lost", num_cpus=READ_CPUS)
        _consume(build_dataset(cfg, again, infos, plan, rows_per_block=1,
                               stats_dir=f"{staging}/actors", weights_files=shipped), committer)
    table.refresh()
    still = D.find_missing(cfg.out, staging, parts, run_id=run_id, since=since, source="lost",
                           dest="crashed")
    if still:
        rows = D.read_bucket_files(staging, "crashed")
        logger.error("%d images crashed their worker on every try; recorded as WorkerCrashed", still)
        committer.add_crashed(rows, f"the worker processing this image died {TASK_RETRIES + 1} "
                                    "times, also when it was tried alone")
        committer.flush()
    return still
