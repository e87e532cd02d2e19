"""Job configs: one frozen dataclass per job; the CLI builds it, the job takes it."""

from __future__ import annotations

from dataclasses import dataclass, field

from models import weights as W
from models.decode import DEFAULT_MAX_IMAGE_MB, DEFAULT_MAX_PIXELS, max_image_bytes
from models.errors import LakelensError
from models.registry import DEFAULT_ARCHS, DEFAULT_TASKS, TASKS, check_arch, check_task
from pipelines.lake.sources import canonical


@dataclass(frozen=True)
class TaskConfig:
    """One model stage: what to build and how to batch it."""

    task: str
    arch: str
    weights: str
    image_size: int | None = None
    score_threshold: float = 0.5
    batch_size: int = 8
    torch_threads: int = 1
    device: str | None = None  # None: CUDA when the actor sees a GPU, else CPU


@dataclass(frozen=True)
class AnnotateConfig:
    """`lakelens annotate`. Task maps (weights, archs) hold only what the user set."""

    sources: tuple[str, ...]
    out: str
    tasks: tuple[str, ...] = DEFAULT_TASKS
    weights: dict[str, str] = field(default_factory=dict)  # task -> spec; missing: default
    archs: dict[str, str] = field(default_factory=dict)  # task -> arch; missing: default
    image_size: int | None = None
    score_threshold: float = 0.5
    batch_size: int = 8
    max_gpus: int | None = None  # GPU actors may grow to this on an autoscaling cluster
    address: str | None = None
    limit: int | None = None
    full: bool = False  # re-annotate every listed image, not only new and changed ones
    prune: bool = False  # close the current rows of images that are no longer listed
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB  # bytes read per image at most (MiB)
    chunk_size: int = 50_000  # images per commit at most (also committed at 128 MiB or 5 minutes)
    max_error_rate: float = 0.5  # exit non-zero above it (once >= 100 images were tried)
    index: str | None = None  # INDEX_DIR to bring up to date after the run
    buckets: int = 16  # hash partitions of a new table (fixed when the table is created)
    num_cpus: int | None = None  # local Ray only; None: all of this machine's
    lease_s: float = 900.0  # object-store tables: how long a run that stops renewing keeps its lease

    def __post_init__(self) -> None:
        if not self.sources:
            raise LakelensError("no SOURCE given; pass a directory, glob, manifest or URI")
        # Local paths made absolute here, on the driver: a task on another worker (or a
        # job's other working directory) must not resolve them against its own cwd.
        object.__setattr__(self, "sources", tuple(canonical(s) for s in self.sources))
        object.__setattr__(self, "out", canonical(self.out))
        if self.index is not None:
            object.__setattr__(self, "index", canonical(self.index))
        if not self.tasks:
            raise LakelensError(f"no task given; choose from {', '.join(TASKS)}")
        for task in self.tasks:
            check_task(task)
        if len(set(self.tasks)) != len(self.tasks):
            raise LakelensError(f"a task is listed twice in {','.join(self.tasks)}")
        for task, arch in self.archs.items():
            check_task(task)
            check_arch(task, arch)
        for task, spec in self.weights.items():
            check_task(task)
            W.validate_spec(spec, what=f"--weights {task}")
        for name in ("batch_size", "chunk_size", "max_pixels", "buckets"):
            if getattr(self, name) < 1:
                raise LakelensError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.max_image_mb > 0:
            raise LakelensError(f"--max-image-mb must be > 0, got {self.max_image_mb}")
        if self.max_gpus is not None and self.max_gpus < 1:
            raise LakelensError(f"--max-gpus must be >= 1, got {self.max_gpus}")
        if self.image_size is not None and not 16 <= self.image_size <= 4096:
            raise LakelensError(f"--image-size must be in 16..4096, got {self.image_size}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise LakelensError(f"--score-threshold must be in [0, 1], got {self.score_threshold}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise LakelensError(f"--max-error-rate must be in [0, 1], got {self.max_error_rate}")
        if self.limit is not None and self.limit < 1:
            raise LakelensError(f"--limit must be >= 1, got {self.limit}")
        if not self.lease_s >= 5:
            raise LakelensError(f"--lease-s must be >= 5 (seconds), got {self.lease_s}")

    @property
    def max_image_bytes(self) -> int:
        return max_image_bytes(self.max_image_mb)

    def weights_for(self, task: str) -> str:
        return self.weights.get(task, W.DEFAULT)

    def arch_for(self, task: str) -> str:
        """The arch the user set, else the checkpoint's own, else the task's default."""
        if task in self.archs:
            return self.archs[task]
        spec = self.weights_for(task)
        if W.is_path_spec(spec):
            arch = W.read_checkpoint(spec).meta.get("arch")
            if arch:
                check_arch(task, arch)
                return arch
        return DEFAULT_ARCHS[task]
