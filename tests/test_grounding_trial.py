"""The rank-contrast term `benchmarks/grounding_trial.py --rank-contrast` adds to the grounding loss."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from grounding_trial import rank_contrast


def _lesions(n: int = 24, attributes: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, attributes, generator=torch.Generator().manual_seed(seed))


def test_an_embedding_ordered_by_the_attributes_scores_lower_than_a_shuffled_one() -> None:
    targets, weights = _lesions(), torch.ones(3)
    ordered = torch.cat([targets, torch.zeros(len(targets), 5)], dim=1)  # cosine neighbours = attribute neighbours
    shuffled = ordered[torch.randperm(len(ordered), generator=torch.Generator().manual_seed(1))]
    assert rank_contrast(ordered, targets, weights, 0.1) < rank_contrast(shuffled, targets, weights, 0.1) - 0.5


def test_an_attribute_a_view_does_not_show_counts_in_no_distance() -> None:
    targets, weights = _lesions(), torch.ones(3)
    embedding = torch.randn(len(targets), 8, generator=torch.Generator().manual_seed(2))
    keep = torch.ones_like(targets)
    keep[::2, 2] = 0  # every other view changed the third attribute (a photometric view)
    changed = targets.clone()
    changed[::2, 2] += 5.0  # so its stated value there says nothing
    same = rank_contrast(embedding, targets, weights, 0.1, keep)
    assert torch.allclose(same, rank_contrast(embedding, changed, weights, 0.1, keep))
    assert not torch.allclose(same, rank_contrast(embedding, changed, weights, 0.1))
    zero_weight = torch.tensor([1.0, 1.0, 0.0])  # a weight of 0 leaves the attribute out the same way
    left_out = rank_contrast(embedding, targets, zero_weight, 0.1)
    assert torch.allclose(left_out, rank_contrast(embedding, changed, zero_weight, 0.1))


def test_the_term_trains_the_embedding() -> None:
    targets = _lesions()
    embedding = torch.randn(len(targets), 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    loss = rank_contrast(embedding, targets, torch.ones(3), 0.1)
    loss.backward()
    assert torch.isfinite(loss) and embedding.grad is not None and embedding.grad.abs().sum() > 0
