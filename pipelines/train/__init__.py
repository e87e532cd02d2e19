"""`lakelens train detector|embedder|semantic`: Ray Train on a COCO dataset.

    config.py    TrainConfig, TrainSummary, the run directory's file names
    driver.py    run(cfg): checks, starts the TorchTrainer, copies the best model out
    loops.py     the per-worker training loops Ray Train runs (LOOPS[kind])
    worker.py    what every loop shares: LR schedule, ranks, checkpoint save/restore
    datasets.py  COCO detection, embedding and semantic datasets

Imports point one way: driver -> loops -> worker -> config; driver and loops -> datasets.
"""

from pipelines.train.config import KINDS, METRICS_FILE, MODEL_FILE, TrainConfig, TrainSummary
from pipelines.train.driver import run

__all__ = ["KINDS", "METRICS_FILE", "MODEL_FILE", "TrainConfig", "TrainSummary", "run"]
