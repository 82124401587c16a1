"""Pieces the cross tests against `peft` share: a small MLP, seeded inputs, the output of a
model as one tensor, trainable tensors moved off their initial values, and the check that
both libraries merge alike."""

from __future__ import annotations

import copy

import torch
from conftest import VOCAB
from torch import Tensor, nn

import lorakit


class MLP(nn.Module):
    """Two Linears, with and without bias, on float inputs (12 -> 16 -> 10)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin1 = nn.Linear(12, 16)
        self.lin2 = nn.Linear(16, 10, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(torch.tanh(self.lin1(x)))


def features() -> Tensor:
    """(3, 5, 12) floats for `MLP`, the same on every call."""
    return torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))


def tokens() -> Tensor:
    """(2, 7) token ids for the tiny transformers models, the same on every call."""
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def model_output(model: nn.Module, x: Tensor) -> Tensor:
    """The model's output as one tensor (logits for transformers models)."""
    out = model(x)
    return out if isinstance(out, Tensor) else out.logits


def nudge_trainable(model: nn.Module, seed: int) -> None:
    """Every trainable tensor moved by seeded noise, as after training (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def assert_same_merge(ref: nn.Module, model: nn.Module, x: Tensor, atol: float) -> None:
    """PEFT's `merge_and_unload` of `ref` and lorakit's of `model` (both on copies) give the
    same outputs for x and the same tensors under PEFT's names."""
    merged_ref = copy.deepcopy(ref).merge_and_unload()
    merged = lorakit.merge_and_unload(copy.deepcopy(model))
    torch.testing.assert_close(
        model_output(merged, x), model_output(merged_ref, x), rtol=0, atol=atol
    )
    for name, weight in merged_ref.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], weight, rtol=0, atol=atol)
