"""Metric-learning losses and P x K sampling, on hand-made cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from index.evaluate import recall_at_k
from models.errors import LakelensError
from models.metric import PKSampler, contrastive_loss, metric_loss, multi_similarity_loss


def _separated() -> tuple[torch.Tensor, torch.Tensor]:
    """Two identities, two examples each, identical within and orthogonal across."""
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    return emb, torch.tensor([0, 0, 1, 1])


def test_losses_are_zero_when_identities_are_separated() -> None:
    emb, labels = _separated()
    assert contrastive_loss(emb, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert multi_similarity_loss(emb, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_contrastive_known_value() -> None:
    # positives at distance sqrt(2) (orthogonal), negatives at distance 0 (identical):
    # pos term (sqrt2 - 0)^2 = 2, neg term (1 - 0)^2 = 1 -> 3
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert contrastive_loss(emb, labels).item() == pytest.approx(3.0, rel=1e-4)


def test_multi_similarity_known_value() -> None:
    # one anchor pattern: positive similarity 0, negative similarity 1 (all pairs mined)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    pos = np.log1p(np.exp(-2.0 * (0.0 - 0.5))) / 2.0
    neg = np.log1p(np.exp(50.0 * (1.0 - 0.5))) / 50.0
    assert multi_similarity_loss(emb, labels).item() == pytest.approx(pos + neg, rel=1e-4)


@pytest.mark.parametrize("loss", ["multi_similarity", "contrastive"])
def test_minimising_the_loss_separates_identities(loss: str) -> None:
    """Free embeddings, plain gradient descent: the loss falls and Recall@1 reaches 1."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(4)
    raw = torch.randn(len(labels), 16, generator=gen, requires_grad=True)
    opt = torch.optim.SGD([raw], lr=2.0)
    first = None
    for _ in range(200):
        value = metric_loss(loss, F.normalize(raw, dim=1), labels)
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    final = metric_loss(loss, F.normalize(raw, dim=1), labels).item()
    assert final < 0.25 * first
    emb = F.normalize(raw, dim=1).detach().numpy()
    assert recall_at_k(emb, labels.numpy(), (1,))[1] == 1.0


def test_unknown_loss_names_the_choices() -> None:
    emb, labels = _separated()
    with pytest.raises(LakelensError, match="multi_similarity, contrastive"):
        metric_loss("triplet", emb, labels)


def test_pk_batches() -> None:
    labels = [i // 5 for i in range(50)] + [10, 10]  # identity 10 has only 2 examples
    sampler = PKSampler(labels, p=4, k=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 52 // 12
    for batch in batches:
        ids = [labels[i] for i in batch]
        assert len(batch) == 12 and len(set(ids)) == 4
        assert all(ids.count(y) == 3 for y in set(ids))
    assert list(sampler) == batches  # same epoch, same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    other_rank = PKSampler(labels, p=4, k=3, seed=1, rank=1, world_size=2)
    assert len(other_rank) == 52 // 24
    assert list(other_rank) != list(PKSampler(labels, p=4, k=3, seed=1, rank=0, world_size=2))


def test_pk_sampler_refuses_impossible_batches() -> None:
    with pytest.raises(LakelensError, match="only 2"):
        PKSampler([0, 0, 1, 1], p=3, k=2)
    with pytest.raises(LakelensError, match="K >= 2"):
        PKSampler([0, 1, 2], p=2, k=1)
