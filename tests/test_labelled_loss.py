"""The causal-LM loss with the head run only on labelled positions equals the full loss, and
so does every adapter gradient, on tiny Llama (untied, tied) and GPT-2, chunked or not."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_lora, tiny_gpt2, tiny_llama, tiny_mlp
from tiny_hf import llama_config

import lorakit
from lorakit.train.labelled_loss import (
    labelled_logits_only,
    labelled_loss,
    supports_labelled_loss,
)


def tiny_llama_tied() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = llama_config(100)
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


MODELS = {"llama": tiny_llama, "llama-tied": tiny_llama_tied, "gpt2": tiny_gpt2}


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(1, vocab, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :6] = -100  # prompt tokens
    labels[mask == 0] = -100
    labels[2, 6:9] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _adapted(make) -> torch.nn.Module:
    model = make()
    lorakit.inject(model, lorakit.LoraConfig(targets="all-linear", rank=4))
    randomise_lora(model)
    return model.train()


def _loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("chunk_rows", [2048, 5], ids=["one-chunk", "chunks-of-5"])
@pytest.mark.parametrize("name", list(MODELS))
def test_equals_the_full_loss_and_gradients(name: str, chunk_rows: int) -> None:
    model = _adapted(MODELS[name])
    batch = _batch(model.config.vocab_size)
    assert supports_labelled_loss(model)
    full, grads = _loss_and_grads(model, lambda: model(**batch).loss)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    sparse, sparse_grads = _loss_and_grads(
        model, lambda: labelled_loss(model, batch["labels"], chunk_rows=chunk_rows, **inputs)
    )
    assert torch.allclose(full, sparse, atol=1e-5)
    assert grads.keys() == sparse_grads.keys() and len(grads) > 0
    for n in grads:
        assert torch.allclose(grads[n], sparse_grads[n], atol=1e-5), n


def test_the_context_swaps_forward_and_puts_it_back() -> None:
    model = _adapted(tiny_llama)
    batch = _batch(model.config.vocab_size)
    full = model(**batch).loss
    with labelled_logits_only(model) as active:
        assert active
        out = model(**batch)
        assert out.logits is None and torch.allclose(out.loss, full, atol=1e-5)
        no_labels = {k: v for k, v in batch.items() if k != "labels"}
        assert model(**no_labels).logits.shape[-1] == model.config.vocab_size
    assert "forward" not in vars(model)
    assert model(**batch).logits is not None


def test_no_labelled_position_gives_nan_like_transformers() -> None:
    model = _adapted(tiny_llama)
    batch = _batch(model.config.vocab_size)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.isnan(labelled_loss(model, batch["labels"], **inputs))
    assert torch.isnan(model(**batch).loss)


def test_models_it_cannot_serve_are_left_alone() -> None:
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    for model in (tiny_mlp(), capped):
        assert not supports_labelled_loss(model)
        with labelled_logits_only(model) as active:
            assert not active and "forward" not in vars(model)


def test_a_nested_block_leaves_the_outer_one_in_charge() -> None:
    model = _adapted(tiny_llama)
    batch = _batch(model.config.vocab_size)
    with labelled_logits_only(model):
        outer = model.forward
        with labelled_logits_only(model) as active:
            assert active and model.forward is outer
        assert model.forward is outer and model(**batch).logits is None
    assert "forward" not in vars(model)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("name", ["llama", "llama-tied", "gpt2"])
def test_evaluate_gives_the_full_logits_loss(name: str, batch_size: int) -> None:
    """evaluate() runs the head at labelled positions only; its loss is the full one's, also
    with rows that are shard padding (keep False) and a batch with no labelled row."""
    from lorakit.train import DistEnv, evaluate
    from lorakit.train.data import Collator

    model = _adapted(MODELS[name]).eval()
    batch = _batch(model.config.vocab_size)
    rows = [{k: v[i][batch["attention_mask"][i] == 1].tolist() for k, v in batch.items()
             if k != "attention_mask"} for i in range(3)]  # fmt: skip
    rows.append({"input_ids": [5, 6, 7], "labels": [-100, -100, -100]})
    env, collate = DistEnv(), Collator(0)
    got = evaluate(model, rows, "causal-lm", collate, env, batch_size=batch_size)
    full = collate(rows)
    logits = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), full["labels"][:, 1:].reshape(-1)
    )
    assert got["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert "forward" not in vars(model)
