"""Tiny Llamas for the trainable-token tests: untied, or with lm_head tied to the embedding."""

from __future__ import annotations

import torch
from conftest import SEED, VOCAB
from tiny_hf import llama_config
from torch import Tensor, nn
from transformers import LlamaForCausalLM

ROWS = (3, 7, 42)  # the token ids whose rows train in most tests


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    """The tests' tiny Llama; with `tied`, lm_head's weight is the embedding's parameter."""
    config = llama_config(VOCAB)
    config.tie_word_embeddings = tied
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def ids_with_rows() -> Tensor:
    """(2, 8) token ids that use every id of ROWS and some others, the same on every call."""
    other = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([list(ROWS), list(reversed(ROWS))])
    return torch.cat([rows[:, :2], other, rows[:, 2:]], dim=1)


def set_rows(model: nn.Module, seed: int) -> None:
    """Every trainable-token delta replaced by seeded noise (as after training)."""
    from lorakit.layers.trainable_tokens import TokenRows

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TokenRows):
                module.delta.copy_(torch.randn(module.delta.shape, generator=generator))
