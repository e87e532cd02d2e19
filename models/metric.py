"""Metric learning with pytorch-metric-learning: losses, and the retrieval metrics the
field reports (Recall@K, MAP@R, R-precision; Musgrave et al. 2020), plus P x K sampling.

Losses (`--loss`), on L2-normalised embeddings:
- ``multi_similarity`` (default): Wang et al. 2019, with its pair miner (epsilon 0.1).
- ``contrastive``: Hadsell, Chopra, LeCun 2006, positives within 0, negatives beyond 1.
- ``triplet_margin``: every triplet of the batch, margin 0.1.
- ``proxy_anchor``: Kim et al. 2020, one learned proxy per training identity, margin 0.1,
  alpha 32; the proxies train in their own optimiser group at 100x the model's LR.
- ``arcface``: Deng et al. 2019, a learned class-weight matrix, additive angular margin
  28.6 degrees, scale 64; its weights train at the model's LR, in their own group.

The last two own parameters, so they are modules built per training run
(``build_loss(name, num_classes=..., dim=...)``); ``metric_loss`` runs the others.

A P x K batch holds P identities with K examples each, so every anchor has positives.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.errors import LakelensError
from models.registry import LOSSES

# the losses that own parameters ([num_classes, dim] proxies or class weights), and the
# multiple of the model's LR their own optimiser group trains at: Kim et al. 2020 train
# ProxyAnchor's proxies at 100x the backbone's LR; ArcFace's class weights are a
# classifier layer, trained at the backbone's LR in Deng et al. 2019 (insightface)
LOSS_LR_SCALE: dict[str, float] = {"proxy_anchor": 100.0, "arcface": 1.0}


class MetricLoss(nn.Module):
    """A pytorch-metric-learning loss with its miner: ``forward(emb, labels)`` -> scalar.

    emb: float[N, d], unit rows; labels: int64[N], in 0..num_classes-1 for the losses
    that own parameters. The scalar keeps the graph even when no pair is active (DDP
    needs every parameter used). ``lr_scale`` is the multiple of the model's LR the
    loss's own parameters train at (1.0 and no parameters for pair-based losses).
    """

    def __init__(self, name: str, loss: nn.Module, miner: nn.Module | None = None,
                 lr_scale: float = 1.0):
        super().__init__()
        self.name, self.loss, self.miner, self.lr_scale = name, loss, miner, lr_scale

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(emb, labels, self.miner(emb, labels) if self.miner is not None else None)


def build_loss(name: str, *, num_classes: int | None = None, dim: int | None = None) -> MetricLoss:
    """The named loss as a module. ``proxy_anchor`` and ``arcface`` own parameters, so they
    need ``num_classes`` (training labels are 0..num_classes-1) and ``dim`` (the embedding
    size); their parameters are randomly initialised from torch's global RNG.
    Raises LakelensError naming the valid losses when `name` is unknown."""
    from pytorch_metric_learning import losses, miners

    if name in LOSS_LR_SCALE and (num_classes is None or dim is None or num_classes < 1 or dim < 1):
        raise LakelensError(f"loss {name!r} owns [num_classes, dim] parameters; got "
                            f"num_classes={num_classes}, dim={dim}")
    if name == "multi_similarity":
        return MetricLoss(name, losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5),
                          miners.MultiSimilarityMiner(epsilon=0.1))
    if name == "contrastive":
        return MetricLoss(name, losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0))
    if name == "triplet_margin":
        return MetricLoss(name, losses.TripletMarginLoss(margin=0.1))
    if name == "proxy_anchor":
        return MetricLoss(name, losses.ProxyAnchorLoss(num_classes, dim, margin=0.1, alpha=32),
                          lr_scale=LOSS_LR_SCALE[name])
    if name == "arcface":
        return MetricLoss(name, losses.ArcFaceLoss(num_classes, dim, margin=28.6, scale=64),
                          lr_scale=LOSS_LR_SCALE[name])
    raise LakelensError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


@functools.cache
def _parameter_free(name: str) -> MetricLoss:
    if name in LOSS_LR_SCALE:
        raise LakelensError(f"loss {name!r} owns parameters; build it with "
                            "build_loss(name, num_classes=..., dim=...)")
    return build_loss(name)


def metric_loss(name: str, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The named parameter-free loss of emb (float[N, d], unit rows) with labels (int[N])."""
    return _parameter_free(name)(emb, labels)


def retrieval_metrics(emb: np.ndarray, labels: np.ndarray,
                      ks: Sequence[int] = (1, 2, 4, 8)) -> dict[str, float]:
    """Each embedding queries all the others: Recall@K (a same-label item among the K
    nearest), MAP@R and R-precision (R = the query's number of same-label others), by
    pytorch-metric-learning's AccuracyCalculator on cosine similarity."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    x = torch.as_tensor(np.asarray(emb, np.float32))
    y = torch.as_tensor(np.asarray(labels))
    if len(x) < 2:
        raise LakelensError(f"retrieval metrics need at least 2 embeddings, got {len(x)}")
    ks = [k for k in ks if k < len(x)]
    counts = torch.unique(y, return_counts=True)[1]
    recall_names = [f"recall_at_{k}" for k in ks]

    class Calculator(AccuracyCalculator):
        def requires_knn(self):
            return super().requires_knn() + recall_names

    for k in ks:
        setattr(Calculator, f"calculate_recall_at_{k}", _recall_at(k))
    calc = Calculator(include=("mean_average_precision_at_r", "r_precision", *recall_names),
                      k=int(min(len(x) - 1, max(max(ks, default=1), int(counts.max())))),
                      knn_func=CustomKNN(CosineSimilarity()))
    got = calc.get_accuracy(x, y, ref_includes_query=True)
    out = {f"recall@{k}": float(got[f"recall_at_{k}"]) for k in ks}
    out["map@r"] = float(got["mean_average_precision_at_r"])
    out["r_precision"] = float(got["r_precision"])
    return out


def _recall_at(k: int):
    def calculate(self, knn_labels, query_labels, **kwargs) -> float:
        hit = (knn_labels[:, :k] == query_labels[:, None]).any(dim=1)
        return float(hit.float().mean())

    return calculate


@dataclass
class PKSampler:
    """Batches of P identities x K examples (a batch sampler for a DataLoader).

    Each rank draws its own batches from its own seed, so ranks see different identities;
    an identity with fewer than K examples is sampled with replacement. ``len`` is the
    number of batches per epoch: the examples divided by P*K*world_size.
    """

    labels: Sequence[int]
    p: int
    k: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    epoch: int = 0

    def __post_init__(self) -> None:
        if self.p < 2 or self.k < 2:
            raise LakelensError(f"P x K sampling needs P >= 2 and K >= 2, got P={self.p}, K={self.k}")
        by_label: dict[int, list[int]] = {}
        for i, y in enumerate(self.labels):
            by_label.setdefault(int(y), []).append(i)
        self._by_label = {y: np.asarray(ix) for y, ix in sorted(by_label.items())}
        if len(self._by_label) < self.p:
            raise LakelensError(f"P={self.p} identities per batch, but the data has only "
                                f"{len(self._by_label)}; lower --p")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, len(self.labels) // (self.p * self.k * self.world_size))

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        ids = list(self._by_label)
        for _ in range(len(self)):
            batch: list[int] = []
            for y in rng.choice(len(ids), size=self.p, replace=False):
                pool = self._by_label[ids[y]]
                batch += rng.choice(pool, size=self.k, replace=len(pool) < self.k).tolist()
            yield batch
