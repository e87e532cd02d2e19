"""Metric learning: pair losses on L2-normalised embeddings and P x K batch sampling.

- ``contrastive``: the margin form (Hadsell, Chopra, LeCun 2006) on Euclidean distances:
  positives pulled inside ``pos_margin``, negatives pushed beyond ``neg_margin``; each
  term averaged over the pairs that still violate it.
- ``multi_similarity``: Wang et al. 2019 (CVPR), pair mining plus soft weighting of
  positives and negatives on cosine similarity; the stronger default.

A P x K batch holds P identities with K examples each, so every anchor has positives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import LakelensError

LOSSES: tuple[str, ...] = ("multi_similarity", "contrastive")


def _pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def contrastive_loss(emb: torch.Tensor, labels: torch.Tensor, *, pos_margin: float = 0.0,
                     neg_margin: float = 1.0) -> torch.Tensor:
    """emb: float[N, d] unit rows; labels: int[N]. Returns a scalar."""
    pos, neg = _pair_masks(labels)
    # sqrt of a clamped squared distance: finite gradient at d = 0
    dist = (2.0 - 2.0 * emb @ emb.T).clamp_min(1e-12).sqrt()
    pos_terms = F.relu(dist[pos] - pos_margin).pow(2)
    neg_terms = F.relu(neg_margin - dist[neg]).pow(2)
    return _mean_nonzero(pos_terms) + _mean_nonzero(neg_terms)


def _mean_nonzero(x: torch.Tensor) -> torch.Tensor:
    active = x > 0
    if not active.any():
        return x.sum() * 0.0  # keeps the graph (DDP needs every parameter used)
    return x[active].mean()


def multi_similarity_loss(emb: torch.Tensor, labels: torch.Tensor, *, alpha: float = 2.0,
                          beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1) -> torch.Tensor:
    """emb: float[N, d] unit rows; labels: int[N]. Returns a scalar."""
    sim = emb @ emb.T
    pos, neg = _pair_masks(labels)
    inf = torch.tensor(float("inf"), device=emb.device, dtype=sim.dtype)
    hardest_pos = torch.where(pos, sim, inf).min(dim=1, keepdim=True).values
    hardest_neg = torch.where(neg, sim, -inf).max(dim=1, keepdim=True).values
    # mining: keep negatives more similar than the hardest positive (minus epsilon) and
    # positives less similar than the hardest negative (plus epsilon)
    neg_kept = neg & (sim + epsilon > hardest_pos)
    pos_kept = pos & (sim - epsilon < hardest_neg)
    zeros = torch.zeros_like(sim)
    pos_term = torch.log1p(torch.where(pos_kept, torch.exp(-alpha * (sim - base)), zeros).sum(1)) / alpha
    neg_term = torch.log1p(torch.where(neg_kept, torch.exp(beta * (sim - base)), zeros).sum(1)) / beta
    active = pos_kept.any(1) | neg_kept.any(1)
    if not active.any():
        return sim.sum() * 0.0
    return (pos_term + neg_term)[active].mean()


def metric_loss(name: str, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if name == "multi_similarity":
        return multi_similarity_loss(emb, labels)
    if name == "contrastive":
        return contrastive_loss(emb, labels)
    raise LakelensError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


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
