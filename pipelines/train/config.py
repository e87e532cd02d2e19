"""`lakelens train`'s job config and summary, and the names of a run directory's files.

The CLI builds a TrainConfig; the driver passes it into Ray Train as `asdict(cfg)` and
each worker rebuilds it (and so validates it again) from that dict.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from models import weights as W
from models.errors import LakelensError
from models.registry import DEFAULT_ARCHS, check_arch

KINDS = ("detector", "embedder", "semantic")
RAY_DIR = "ray"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "train_config.json"
# what a resumed run must share with the run it continues
RESUME_KEYS = ("kind", "task", "arch", "init", "data", "image_size", "dim", "unit", "loss")


@dataclass(frozen=True)
class TrainConfig:
    """`lakelens train`. Detector batches are `batch_size` images per worker; embedder
    batches are P identities x K examples per worker."""

    kind: str
    data: str
    out: str
    task: str = "detect"  # detector: detect, segment or pose; embedder: embed
    arch: str | None = None  # None: the task's default
    init: str = W.DEFAULT
    workers: int = 2
    gpu: bool = False
    cpus_per_worker: float = 1.0
    epochs: int = 10
    batch_size: int = 4
    lr: float | None = None  # None: 3e-3 from random init, 1e-4 when fine-tuning
    weight_decay: float = 1e-4
    image_size: int | None = None  # detector's shorter side; None: the arch's
    max_steps_per_epoch: int | None = None
    loader_workers: int | None = None  # DataLoader processes per worker; None: from its CPUs
    loss: str = "multi_similarity"
    p: int = 8
    k: int = 4
    dim: int | None = 128  # embedder projection; None: the trunk's own features
    unit: str = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    max_failures: int = 0
    address: str | None = None
    num_cpus: int | None = None  # local Ray only

    def __post_init__(self) -> None:
        from models.registry import LOSSES
        from pipelines.train.datasets import DETECTION_TASKS, UNITS

        if self.kind not in KINDS:
            raise LakelensError(f"unknown training kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.kind == "detector" and self.task not in DETECTION_TASKS:
            raise LakelensError(f"--task {self.task!r}: choose from {', '.join(DETECTION_TASKS)}")
        if self.kind == "embedder" and self.task != "embed":
            raise LakelensError(f"an embedder's task is 'embed', not {self.task!r}")
        if self.kind == "semantic" and self.task != "semantic":
            raise LakelensError(f"a semantic model's task is 'semantic', not {self.task!r}")
        if self.kind == "semantic" and self.batch_size < 2 and "deeplabv3" in self.model_arch:
            raise LakelensError(f"{self.model_arch} trains on --batch-size 2 or more (BatchNorm in "
                                "its ASPP image-pooling branch sees one value per image)")
        check_arch(self.task, self.model_arch)
        W.validate_spec(self.init, what="--init")
        for name in ("workers", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise LakelensError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise LakelensError(f"--max-steps-per-epoch must be >= 1, got {self.max_steps_per_epoch}")
        if self.cpus_per_worker <= 0:
            raise LakelensError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise LakelensError(f"--lr must be in (0, 1), got {self.lr}")
        if self.image_size is not None and not 16 <= self.image_size <= 4096:
            raise LakelensError(f"--image-size must be in 16..4096, got {self.image_size}")
        if self.loss not in LOSSES:
            raise LakelensError(f"unknown --loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.unit not in UNITS:
            raise LakelensError(f"unknown --unit {self.unit!r}; choose from {', '.join(UNITS)}")
        if self.dim is not None and self.dim < 2:
            raise LakelensError(f"--dim must be >= 2, got {self.dim}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise LakelensError(f"--loader-workers must be >= 0, got {self.loader_workers}")
        if self.resume and self.overwrite:
            raise LakelensError("--resume continues a run and --overwrite discards it; pass one")

    @property
    def model_arch(self) -> str:
        return self.arch or DEFAULT_ARCHS[self.task]

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-3 if self.init == W.RANDOM else 1e-4)


@dataclass(frozen=True)
class TrainSummary:
    out: str
    model: str
    best_epoch: int
    best: dict[str, float]
    epochs_run: int
    resumed_from_epoch: int
    wall_s: float

    def describe(self) -> str:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in self.best.items())
        resumed = f" (resumed after epoch {self.resumed_from_epoch})" if self.resumed_from_epoch else ""
        return (f"Trained {self.epochs_run} epochs{resumed} in {self.wall_s:.0f} s; best epoch "
                f"{self.best_epoch}: {scores}. Weights: {self.model} "
                f"(annotate --weights TASK={self.model}); history in "
                f"{os.path.join(self.out, METRICS_FILE)}.")
