"""Test helpers: a tiny detector trained here on synthetic shapes, Parquet readers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
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


def read_current(out: Path, status: str | None = None) -> pa.Table:
    """The current view of DIR's table (optionally only `status` rows), as pyarrow."""
    from pipelines.lake.table import open_table

    return open_table(str(out)).current_table(status=status)


def read_results(out: Path) -> pa.Table:
    return read_current(out, "ok")


def read_errors(out: Path) -> pa.Table:
    return read_current(out, "error")


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
                  run_id: str = "run-a", null_rows: int = 0, spec: str = "random") -> Path:
    """Commit `vectors` as result rows of DIR's lake table (created if missing) through
    the table's real commit path, plus `null_rows` rows without an embedding. An id that
    already has a current row is closed and replaced, as annotate does for changed images."""
    from datetime import UTC, datetime

    from pipelines.lake.table import create_or_open, save_meta
    from pipelines.schema import TABLE_SCHEMA

    n, dim = vectors.shape
    ids = ids or [f"img{i:07d}" for i in range(n)]
    hashes = hashes or [f"h-{i}" for i in ids]
    all_ids = ids + [f"null{i}" for i in range(null_rows)]
    total = n + null_rows
    table = create_or_open(str(directory), buckets=4)
    table.meta["embedding_dim"] = dim
    table.meta["models"] = {"embed": {"arch": embedder[0], "weights_id": embedder[1], "spec": spec,
                                      "labels": [], "keypoint_names": [], "embedding_dim": dim}}
    save_meta(table)
    models = [{"task": "embed", "arch": embedder[0], "weights": embedder[1]}]
    emb = pa.array([v.tolist() for v in vectors] + [None] * null_rows, pa.list_(pa.float32()))
    cols = {
        "image_id": all_ids,
        "uri": [f"/lake/{i}.jpg" for i in all_ids],
        "content_hash": hashes + ["x"] * null_rows, "status": ["ok"] * total,
        "width": [64] * total, "height": [48] * total, "embedding": emb,
        "models": [models] * total, "run_id": [run_id] * total,
        "annotated_at": [datetime.now(UTC)] * total, "reason": ["new"] * total,
    }
    rows = pa.table({f.name: (cols[f.name] if isinstance(cols.get(f.name), pa.Array) else
                              pa.array(cols[f.name], f.type)) if f.name in cols else pa.nulls(total, f.type)
                     for f in TABLE_SCHEMA}, schema=TABLE_SCHEMA)
    seq = (table.dt.transaction_version(f"lakelens.run.{run_id}") or 0) + 1
    table.commit(rows, run_id=run_id, seq=seq, epoch=1)
    return directory


def commit_rows(directory: Path, rows: list[dict], *, run_id: str = "r") -> Path:
    """Commit hand-made result rows (dicts of TABLE_SCHEMA columns; status and run fields
    filled in) as one chunk of DIR's lake table, created if missing."""
    from datetime import UTC, datetime

    from pipelines.lake.table import create_or_open
    from pipelines.schema import TABLE_SCHEMA

    table = create_or_open(str(directory), buckets=4)
    full = [{"status": "ok", "run_id": run_id, "reason": "new", "annotated_at": datetime.now(UTC), **r}
            for r in rows]
    data = pa.Table.from_pylist(full, schema=TABLE_SCHEMA)
    seq = (table.dt.transaction_version(f"lakelens.run.{run_id}") or 0) + 1
    table.commit(data, run_id=run_id, seq=seq, epoch=1)
    return directory


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(log_dir: Path) -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 (a separate process, a real HTTP endpoint) for the
    block. Yields the AWS_* variables that point boto3, pyarrow and delta-rs at it; set
    them in the environment (monkeypatch) so that lakelens and its child processes see them."""
    import socket
    import subprocess
    import sys
    import time

    port = free_port()
    log = log_dir / "moto.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, log.read_text()
                time.sleep(0.2)
        yield {"AWS_ACCESS_KEY_ID": "lakelens-test", "AWS_SECRET_ACCESS_KEY": "lakelens-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true",
               "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        server.terminate()
        server.wait(timeout=10)


def train_tiny_embedder(data: Path, path: Path, *, epochs: int, seed: int = 0) -> Path:
    """Train the `tiny` embedder the way `lakelens demo` does (pipelines.train.loops's
    embedder loop: random init, 128-d projection, multi-similarity loss on P=8 x K=4
    batches of the train split's image families, random crops and flips, AdamW at 3e-3
    with warm-up and cosine), in this process on one worker instead of Ray Train's DDP.
    Writes the checkpoint `annotate --weights embed=PATH` loads."""
    from models.embedding import build_for_training
    from models.metric import PKSampler, build_loss
    from pipelines.train.datasets import EmbedDataset, contiguous_labels, embed_items
    from pipelines.train.worker import LR_FLOOR, lr_schedule

    torch.manual_seed(seed)
    items, _ = embed_items(data / "train" / "annotations.json")
    items, _ = contiguous_labels(items)
    model, _, crop = build_for_training("tiny", init="random", dim=128, seed=seed)
    loss = build_loss("multi_similarity")
    dataset = EmbedDataset(items, crop, train=True)
    sampler = PKSampler(dataset.labels, 8, 4, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    lr = 3e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = lr_schedule(opt, len(loader) * epochs, floor=LR_FLOOR * lr)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            value = loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # the loop's GRAD_CLIP
            opt.step()
            sched.step()
    model.eval()
    save_checkpoint(path, model.state_dict(), {"arch": "tiny", "task": "embed", "dim": model.dim})
    return path
