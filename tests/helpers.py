"""Test helpers: a tiny detector trained here on synthetic shapes, Parquet readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.detection import build_detector
from models.weights import save_checkpoint
from pipelines.synth import make_scene

TRAIN_SIZE = (128, 96)  # width, height of the training scenes
TRAIN_IMAGE_SIZE = 96  # the detector's shorter side, in training and in annotate


def shapes_scene(rng: np.random.Generator, width: int = TRAIN_SIZE[0],
                 height: int = TRAIN_SIZE[1]):
    return make_scene(rng, width=width, height=height, objects=(1, 2), size=(0.35, 0.6),
                      categories=("rectangle",))


def train_tiny_detector(path: Path, *, steps: int = 250, seed: int = 0) -> Path:
    """Train fasterrcnn_tiny to find rectangles (one class); ~1 minute on 2 CPUs.

    Writes a lakelens checkpoint that `annotate --weights detect=PATH` loads.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model, _ = build_detector("fasterrcnn_tiny", weights="random", image_size=TRAIN_IMAGE_SIZE,
                              num_classes=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs run faster single-threaded on 2 cores
    try:
        for _ in range(steps):
            images, targets = [], []
            for _ in range(4):
                scene = shapes_scene(rng)
                images.append(torch.from_numpy(scene.image.copy()).permute(2, 0, 1).float() / 255)
                targets.append({
                    "boxes": torch.tensor([o.box for o in scene.objects], dtype=torch.float32),
                    "labels": torch.ones(len(scene.objects), dtype=torch.int64)})
            loss = sum(model(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(path, model.state_dict(), {
        "arch": "fasterrcnn_tiny", "task": "detect", "labels": ["__background__", "rectangle"]})
    return path


def read_table(directory: Path) -> pa.Table:
    """All Parquet files of a results/ or errors/ directory as one table (empty if none)."""
    files = sorted(directory.glob("*.parquet"))
    if not files:
        return pa.table({})
    return pa.concat_tables([pq.read_table(f) for f in files])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes a[N, 4] and b[M, 4]."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def clustered_vectors(n: int, dim: int, *, clusters: int = 50, spread: float = 0.3,
                      seed: int = 0) -> np.ndarray:
    """Seeded unit vectors around `clusters` centres (uniform random vectors would make
    recall meaningless: every neighbour is as far as any other)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(clusters, size=n)] + spread * rng.standard_normal((n, dim)).astype(
        np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_results(directory: Path, vectors: np.ndarray, *, ids: list[str] | None = None,
                  hashes: list[str] | None = None, embedder: tuple[str, str] = ("tiny", "random:seed0"),
                  run_id: str = "run-a", annotated_at: int = 0, null_rows: int = 0,
                  spec: str = "random") -> Path:
    """A results file with the real schema (pipelines.schema), holding `vectors` as the
    embedding column plus `null_rows` rows without an embedding."""
    from datetime import UTC, datetime, timedelta

    from pipelines.schema import file_metadata, results_schema

    n, dim = vectors.shape
    ids = ids or [f"img{i:07d}" for i in range(n)]
    hashes = hashes or [f"h-{i}" for i in ids]
    total = n + null_rows
    schema = results_schema(dim)
    models = [{"task": "embed", "arch": embedder[0], "weights": embedder[1]}]
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=annotated_at)
    emb = pa.FixedSizeListArray.from_arrays(
        pa.array(np.concatenate([vectors, np.zeros((null_rows, dim), np.float32)]).ravel()), dim,
        mask=pa.array([False] * n + [True] * null_rows))
    cols = {
        "image_id": ids + [f"null{i}" for i in range(null_rows)],
        "uri": [f"/lake/{i}.jpg" for i in ids] + [f"/lake/null{i}.jpg" for i in range(null_rows)],
        "content_hash": hashes + ["x"] * null_rows,
        "width": [64] * total, "height": [48] * total,
        "detections": [None] * total, "instances": [None] * total, "poses": [None] * total,
        "embedding": emb, "models": [models] * total, "run_id": [run_id] * total,
        "annotated_at": [when] * total,
    }
    table = pa.table({k: pa.array(v, type=schema.field(k).type) if k != "embedding" else v
                      for k, v in cols.items()}, schema=schema)
    table = table.replace_schema_metadata(file_metadata(
        "results", run_id, {"models": [{**models[0], "spec": spec}], "embedding_dim": dim}))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"part-{run_id}.parquet"
    pq.write_table(table, path)
    return path
