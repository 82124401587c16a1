"""The fused op's CPU dropout masks: their statistics, shape, seeding and generator use."""

from __future__ import annotations

import pytest
import torch

from lorakit.dropout_masks import dropout_keep, dropout_mask


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_statistics(p):
    mask = dropout_mask((400, 500), p, seed=7, device=torch.device("cpu"), dtype=torch.float32)
    kept = mask != 0
    assert torch.allclose(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)))
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.005)
    assert mask.mean().item() == pytest.approx(1.0, abs=0.01)  # inverted dropout: E[mask] = 1
    again = dropout_mask((400, 500), p, seed=7, device=torch.device("cpu"), dtype=torch.float32)
    other = dropout_mask((400, 500), p, seed=8, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(mask, again) and not torch.equal(mask, other)


def test_dropout_keep_mask_is_exactly_shaped_and_seeded():
    keep = dropout_keep((3, 5, 7), 0.25, seed=2, device=torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (3, 5, 7)
    assert torch.equal(keep, dropout_keep((3, 5, 7), 0.25, seed=2, device=torch.device("cpu")))
    assert dropout_keep((1000,), 0.0, seed=2, device=torch.device("cpu")).all()


def test_dropout_mask_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    dropout_mask((10, 10), 0.2, seed=1, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(torch.rand(3), expected)
