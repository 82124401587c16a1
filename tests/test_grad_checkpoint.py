"""Gradient checkpointing with adapters: same loss and gradients, on every linear layer,
fused and plain paths, dropout, a frozen embedding; clear error where it cannot apply."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_lora, tiny_gpt2, tiny_llama, tiny_mlp

import lorakit
from lorakit.errors import ConfigError
from lorakit.layers.linear import LinearLora
from lorakit.train.grad_checkpoint import (
    enable_gradient_checkpointing,
    gradient_checkpointing_enabled,
)

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _loss_and_grads(make, checkpointing: bool, dropout: float):
    model = make()
    lorakit.inject(model, lorakit.LoraConfig(targets="all-linear", rank=4, dropout=dropout))
    randomise_lora(model)  # a non-zero delta: A's gradients are not all zero
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    torch.manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, model


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("name", list(MODELS))
def test_same_loss_and_grads(monkeypatch, name: str, dropout: float, fused: bool) -> None:
    if not fused:
        monkeypatch.setattr(LinearLora, "_fused_adapters", lambda self, x: [])
    loss, grads, _ = _loss_and_grads(MODELS[name], False, dropout)
    loss_ckpt, grads_ckpt, model = _loss_and_grads(MODELS[name], True, dropout)
    assert gradient_checkpointing_enabled(model)
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    assert all("lora_A" in n or "lora_B" in n for n in grads), "only adapters train"
    for n in grads:
        assert torch.allclose(grads[n], grads_ckpt[n], atol=1e-6), n


def test_embedding_stays_frozen() -> None:
    _, grads, model = _loss_and_grads(tiny_llama, True, 0.0)
    assert model.get_input_embeddings().weight.grad is None
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_refuses_a_model_without_blocks() -> None:
    with pytest.raises(ConfigError, match="gradient checkpointing needs a transformers model"):
        enable_gradient_checkpointing(tiny_mlp())
