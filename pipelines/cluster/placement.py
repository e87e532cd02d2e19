"""Where the model actors and the read/decode tasks go: the pool plan (fused actors, each
running every asked model on the same decoded batch: one per whole GPU, or one per CPU
core on CPUs; always leaving room for read tasks), node roles by label, and the view of
the cluster both are made from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray

READ_CPUS = 0.25  # a read/decode task's CPU request: short bursts, always schedulable


@dataclass(frozen=True)
class PoolPlan:
    """Resources of the model actors. `fused`: one pool of actors, each running every asked
    model on the same decoded batch. On GPUs one per GPU (a whole GPU each); the pool grows
    from `size` to `max_size` as an autoscaling cluster adds GPUs. On CPUs `size`
    single-threaded actors (fused when more than one task is asked: see _plan_cpu_pools)."""

    size: int
    num_cpus: float
    num_gpus: float
    torch_threads: int
    fused: bool = False
    max_size: int | None = None  # None: == size

    @property
    def pools(self) -> str:
        kind = "fused actor(s), every task in each" if self.fused else "actor(s) per task"
        grow = f" (up to {self.max_size})" if self.max_size and self.max_size > self.size else ""
        return f"{self.size}{grow} {kind}"


def plan_pools(n_pools: int, cpus: float, gpus: float, node_cpus: float | None = None,
               max_gpus: int | None = None, gpu_actor_cpus: float | None = None) -> PoolPlan:
    """Share the cluster between the model actors, leaving CPUs for read/decode/write tasks
    (actor pools holding every CPU starve those tasks and the job hangs). No actor asks
    for more CPUs than the largest node has (`node_cpus`), or it could never be placed; a
    GPU actor asks no more than `gpu_actor_cpus`, what every GPU node can give each of its
    GPUs (so a node's GPUs all get an actor)."""
    if gpus >= 1:
        # Whole GPUs only: fractional requests pack into one GPU (four 0.75-GPU actors on
        # three GPUs cannot all run), so every GPU gets one actor that runs every model.
        size = int(gpus)
        spare = max(cpus - size * READ_CPUS - 1, 0.0) / size
        fits = gpu_actor_cpus if gpu_actor_cpus is not None else (node_cpus or 1.0) - READ_CPUS
        num_cpus = max(min(1.0, spare, fits), 0.0)
        return PoolPlan(size, round(num_cpus, 3), 1.0, max(1, int(spare)), fused=True,
                        max_size=max(size, max_gpus or 0))
    plan = _plan_cpu_pools(n_pools, cpus)
    # Leave READ_CPUS free on every node whatever actors land (or restart) there, so that
    # read/decode tasks can always be scheduled: an actor never takes a whole node.
    cap = node_cpus - READ_CPUS if node_cpus else None
    if cap is not None and cap > 0 and plan.num_cpus > cap:
        total = plan.size * plan.num_cpus
        size = math.ceil(total / cap)
        plan = PoolPlan(size, total / size, 0.0, max(1, min(plan.torch_threads, int(node_cpus))),
                        fused=plan.fused)
    return plan


def _plan_cpu_pools(n_pools: int, cpus: float) -> PoolPlan:
    """One pool of single-threaded actors, one per core of the models' share, each running
    every asked model on its batch (fused). Per-task pools would start an actor process
    per task (each importing torch and building its model before work flows: five
    one-after-another starts on a small machine) and split the cores evenly between
    tasks whose costs differ 50x (a pose R-CNN against a small embedder), so the slowest
    task's pool bounds the run while the others idle; fused actors balance themselves and
    pass no pixels between pools."""
    reserve = max(1.0, cpus // 4)
    # One single-threaded actor per core of the pool's share, reserve included (Ray's CPU
    # counts are for scheduling only: decode and write tasks come in short bursts). For
    # the CPU models here, two 1-thread actors outrun one 2-thread actor (intra-op
    # threading scales poorly on small convolutions; measured in benchmarks/annotate.py).
    size = max(1, int(cpus))
    return PoolPlan(size, max(cpus - reserve, 0.25) / size, 0.0, 1, fused=n_pools > 1)


ROLE_LABEL = "lakelens/role"  # nodes labelled model (GPU work) or decode (read/decode tasks)


@dataclass(frozen=True)
class ClusterView:
    cpus: float
    gpus: float
    node_cpus: float | None
    gpu_actor_cpus: float | None  # CPUs each GPU of the tightest GPU node can give its actor
    roles: frozenset[str]  # the ROLE_LABEL values some alive node carries


def cluster_view() -> ClusterView:
    alive = [n for n in ray.nodes() if n["Alive"]]
    res = [n["Resources"] for n in alive]
    per_gpu = [(r.get("CPU", 0.0) - READ_CPUS) / math.floor(r["GPU"])
               for r in res if r.get("GPU", 0.0) >= 1]
    return ClusterView(cpus=sum(r.get("CPU", 0.0) for r in res) or 1.0,
                       gpus=sum(math.floor(r.get("GPU", 0.0)) for r in res),
                       node_cpus=max((r.get("CPU", 0.0) for r in res), default=None),
                       gpu_actor_cpus=max(min(per_gpu), 0.0) if per_gpu else None,
                       roles=frozenset(n.get("Labels", {}).get(ROLE_LABEL) for n in alive) - {None})


def role_selector(view: ClusterView, role: str) -> dict[str, str] | None:
    """A label selector for `role`, only when some node carries it: on a cluster without
    role labels (or a laptop) a selector would leave the stage unschedulable."""
    return {ROLE_LABEL: role} if role in view.roles else None


def current_plan(n_pools: int, max_gpus: int | None = None) -> PoolPlan:
    """plan_pools for the cluster as it is now (nodes come and go between passes)."""
    view = cluster_view()
    return plan_pools(n_pools, view.cpus, view.gpus, view.node_cpus, max_gpus, view.gpu_actor_cpus)
