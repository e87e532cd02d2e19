"""Metric-learning losses and P x K sampling, on hand-made cases with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from index.evaluate import recall_at_k
from models.errors import LakelensError
from models.metric import LOSS_LR_SCALE, LOSSES, PKSampler, build_loss, metric_loss, retrieval_metrics
from pipelines.train.datasets import EmbedItem, contiguous_labels


def _separated() -> tuple[torch.Tensor, torch.Tensor]:
    """Two identities, two examples each, identical within and orthogonal across."""
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    return emb, torch.tensor([0, 0, 1, 1])


PAIR_LOSSES = [name for name in LOSSES if name not in LOSS_LR_SCALE]


@pytest.mark.parametrize("loss", PAIR_LOSSES)
def test_losses_are_zero_when_identities_are_separated(loss: str) -> None:
    emb, labels = _separated()
    assert metric_loss(loss, emb, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_contrastive_known_value() -> None:
    # positives at distance sqrt(2) (orthogonal), negatives at distance 0 (identical):
    # pos term relu(sqrt2 - 0) = sqrt2, neg term relu(1 - 0) = 1 (each averaged over pairs)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert metric_loss("contrastive", emb, labels).item() == pytest.approx(np.sqrt(2) + 1, rel=1e-4)


def test_multi_similarity_known_value() -> None:
    # one anchor pattern: positive similarity 0, negative similarity 1 (all pairs mined)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    pos = np.log1p(np.exp(-2.0 * (0.0 - 0.5))) / 2.0
    neg = np.log1p(np.exp(50.0 * (1.0 - 0.5))) / 50.0
    assert metric_loss("multi_similarity", emb, labels).item() == pytest.approx(pos + neg, rel=1e-4)


def test_triplet_margin_known_value() -> None:
    # every anchor has one positive at distance sqrt2 and two negatives, at 0 and sqrt2:
    # relu(sqrt2 - 0 + 0.1) and relu(sqrt2 - sqrt2 + 0.1), averaged
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    expected = (np.sqrt(2) + 0.1 + 0.1) / 2
    assert metric_loss("triplet_margin", emb, labels).item() == pytest.approx(expected, rel=1e-4)


def test_proxy_anchor_known_value() -> None:
    """Kim et al. 2020, eq. 4, by hand: proxies at 10, 100 and 200 degrees (any norm:
    cosine similarity), embeddings of identities 0 and 1 only; the positive term averages
    over the 2 proxies with positives, the negative term over all 3 proxies."""
    emb = torch.from_numpy(_at([0, 30, 80, 200]))
    labels = torch.tensor([0, 0, 1, 1])
    proxies = 3.0 * _at([10, 100, 200])
    torch.manual_seed(0)
    loss = build_loss("proxy_anchor", num_classes=3, dim=2)
    with torch.no_grad():
        loss.loss.proxies.copy_(torch.from_numpy(proxies))
    cos = emb.numpy() @ (proxies / 3.0).T  # [4 embeddings, 3 proxies]
    alpha, delta = 32.0, 0.1
    y = labels.numpy()
    pos = [np.log1p(np.exp(-alpha * (cos[y == p, p] - delta)).sum()) for p in (0, 1)]
    neg = [np.log1p(np.exp(alpha * (cos[y != p, p] + delta)).sum()) for p in (0, 1, 2)]
    expected = np.mean(pos) + np.sum(neg) / 3
    assert loss(emb, labels).item() == pytest.approx(expected, rel=1e-5)


def test_arcface_known_value() -> None:
    """Deng et al. 2019, by hand: logits s*cos(theta_y + m) for the own class, s*cos(theta_j)
    for the others (m = 28.6 degrees, s = 64), softmax cross-entropy averaged over the batch."""
    emb = torch.from_numpy(_at([0, 30, 80, 200]))
    labels = torch.tensor([0, 0, 1, 2])
    weights = _at([10, 100, 170])  # class directions; the loss's W is [dim, num_classes]
    torch.manual_seed(0)
    loss = build_loss("arcface", num_classes=3, dim=2)
    with torch.no_grad():
        loss.loss.W.copy_(torch.from_numpy(2.0 * weights.T))
    theta = np.arccos(np.clip(emb.numpy() @ weights.T, -1, 1))  # [4, 3]
    y = labels.numpy()
    rows = np.arange(len(y))
    assert (theta[rows, y] <= np.pi - np.radians(28.6)).all()  # the plain cos(theta + m) branch
    logits = 64.0 * np.cos(theta)
    logits[rows, y] = 64.0 * np.cos(theta[rows, y] + np.radians(28.6))
    log_softmax = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    expected = -log_softmax[rows, y].mean()
    assert loss(emb, labels).item() == pytest.approx(expected, rel=1e-5)


def test_proxy_losses_own_parameters_and_need_their_sizes() -> None:
    torch.manual_seed(0)
    assert build_loss("proxy_anchor", num_classes=5, dim=8).loss.proxies.shape == (5, 8)
    assert build_loss("arcface", num_classes=5, dim=8).loss.W.shape == (8, 5)
    assert not list(build_loss("multi_similarity").parameters())
    assert build_loss("proxy_anchor", num_classes=5, dim=8).lr_scale == 100.0
    with pytest.raises(LakelensError, match="num_classes=None"):
        build_loss("arcface", dim=8)
    emb, labels = _separated()
    with pytest.raises(LakelensError, match="build_loss"):
        metric_loss("proxy_anchor", emb, labels)


def test_contiguous_labels() -> None:
    items = [EmbedItem(Path(f"{i}.jpg"), None, y) for i, y in enumerate([70, -3, 70, 12])]
    relabelled, n = contiguous_labels(items)
    assert n == 3 and [it.label for it in relabelled] == [2, 0, 2, 1]
    assert [it.path for it in relabelled] == [it.path for it in items]


@pytest.mark.parametrize("loss", LOSSES)
def test_minimising_the_loss_separates_identities(loss: str) -> None:
    """Free embeddings, plain gradient descent (the loss's own parameters too): the loss
    falls and Recall@1 reaches 1."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(4)
    raw = torch.randn(len(labels), 16, generator=gen, requires_grad=True)
    torch.manual_seed(0)
    fn = build_loss(loss, num_classes=8, dim=16)
    opt = torch.optim.SGD([raw, *fn.parameters()], lr=2.0)
    first = None
    for _ in range(400):
        value = fn(F.normalize(raw, dim=1), labels)
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    final = fn(F.normalize(raw, dim=1), labels).item()
    assert final < 0.25 * first
    emb = F.normalize(raw, dim=1).detach().numpy()
    assert recall_at_k(emb, labels.numpy(), (1,))[1] == 1.0
    # ArcFace stops once every example is inside its class's margin, clusters not tight
    assert retrieval_metrics(emb, labels.numpy())["map@r"] > (0.8 if loss == "arcface" else 0.9)


def test_unknown_loss_names_the_choices() -> None:
    emb, labels = _separated()
    with pytest.raises(LakelensError, match="multi_similarity, contrastive, triplet_margin, "
                                            "proxy_anchor, arcface"):
        metric_loss("lifted_structure", emb, labels)


def _at(degrees: list[float]) -> np.ndarray:
    r = np.radians(degrees)
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def test_retrieval_metrics_known_answers() -> None:
    """By hand: a at 0 and 10 degrees, b at 25 and 90. Nearest others: a0 -> a10 (hit),
    a10 -> a0 (hit), b25 -> a10 then a0 then b90 (miss, miss, hit), b90 -> b25 (hit).
    R = 1 for everyone, so MAP@R = R-precision = Recall@1 = 3/4; Recall@3 = 1."""
    got = retrieval_metrics(_at([0, 10, 25, 90]), np.array([0, 0, 1, 1]), ks=(1, 2, 3))
    assert got == pytest.approx({"recall@1": 0.75, "recall@2": 0.75, "recall@3": 1.0,
                                 "map@r": 0.75, "r_precision": 0.75})


def _by_definition(emb: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Musgrave et al. 2020's definitions, brute force: the oracle for the library."""
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    recall = {k: [] for k in ks}
    maps, rprec = [], []
    for i in range(len(emb)):
        order = np.argsort(-sim[i], kind="stable")[:-1]
        rel = labels[order] == labels[i]
        r = int((labels == labels[i]).sum()) - 1
        for k in ks:
            recall[k].append(rel[:k].any())
        rprec.append(rel[:r].mean())
        precision_at = np.cumsum(rel[:r]) / np.arange(1, r + 1)
        maps.append((precision_at * rel[:r]).sum() / r)
    return {**{f"recall@{k}": float(np.mean(v)) for k, v in recall.items()},
            "map@r": float(np.mean(maps)), "r_precision": float(np.mean(rprec))}


def test_retrieval_metrics_equal_the_definitions_on_random_embeddings() -> None:
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(12), rng.integers(2, 7, size=12))
    emb = rng.standard_normal((len(labels), 8)).astype(np.float32)
    emb[:, 0] += labels * 0.3  # some structure, so the numbers are not all near chance
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got = retrieval_metrics(emb, labels)
    assert got == pytest.approx(_by_definition(emb, labels, (1, 2, 4, 8)), abs=1e-6)
    assert got["recall@1"] == pytest.approx(recall_at_k(emb, labels, (1,))[1])


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
