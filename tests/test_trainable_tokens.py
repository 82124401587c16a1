"""`LoraConfig.trainable_token_indices`: values, gradients, errors, merge / unmerge, disable,
delete and save / load, on tiny Llamas with and without a tied lm_head. The cross tests
against `peft` are in test_trainable_tokens_peft.py."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, tiny_mlp
from peft_cross import model_output, nudge_trainable
from token_models import ROWS, ids_with_rows, set_rows, tiny_llama
from torch import nn

import lorakit
from lorakit.errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    MergeError,
    TargetNotFoundError,
    UnsupportedLayerError,
)
from lorakit.layers import LoraLayer
from lorakit.layers.trainable_tokens import TokenRows, TrainableTokensMixin

TIED = pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
# (id, lorakit options): the list form, the dict form, and either with LoRA elsewhere
FORMS = [
    ("list", {"trainable_token_indices": list(ROWS)}),
    ("dict", {"trainable_token_indices": {"embed_tokens": list(ROWS)}}),
    ("list-and-lora", {"trainable_token_indices": list(ROWS), "targets": ("q_proj", "v_proj")}),
]
FORM = pytest.mark.parametrize("options", [o for _, o in FORMS], ids=[i for i, _ in FORMS])


def _config(**options: object) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**({"targets": ("q_proj",)} | options))


def _adapted(tied: bool, **options: object) -> nn.Module:
    model = tiny_llama(tied)
    lorakit.inject(model, _config(**options))
    return model


def _table(model: nn.Module) -> torch.Tensor:
    """The embedding table the model computes with now (the trained rows put in)."""
    embedding = model.model.embed_tokens
    weight = embedding.tokens_weight()
    return (embedding.weight if weight is None else weight).detach().clone()


# -- config values ---------------------------------------------------------------------------
CONFIG_ERRORS = [
    ([-1, 2], "trainable_token_indices must hold token ids >= 0, got -1"),
    ([4, 5, 4], "must not repeat a token id, got [4] twice"),
    ([], "must hold at least one token id, got []"),
    ("5", "must be a list of token ids"),
    (5, "must be a list of token ids"),
    ([1.5], "must hold integer token ids, got 1.5"),
    ([True], "must hold integer token ids, got True"),
    ({}, "must name at least one embedding module"),
    ({"": [1]}, "keys must be embedding module names"),
    ({"embed_tokens": []}, "trainable_token_indices['embed_tokens'] must hold at least one"),
]


@pytest.mark.parametrize("value, message", CONFIG_ERRORS, ids=[repr(v) for v, _ in CONFIG_ERRORS])
def test_config_refuses_bad_indices(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _config(trainable_token_indices=value)


@pytest.mark.parametrize(
    "value, stored",
    [(None, None), ([5, 1], (5, 1)), ({"embed_tokens": [2]}, {"embed_tokens": (2,)})],
)
def test_config_normalises_indices(value: object, stored: object) -> None:
    config = _config(trainable_token_indices=value)
    assert config.trainable_token_indices == stored
    hash(config)  # frozen and hashable, as every config


# -- model checks: each refusal leaves the model as it was --------------------------------------
MODEL_ERRORS = [
    ("past-vocab", {"trainable_token_indices": [1, VOCAB]}, ConfigError,
     f"token id {VOCAB} is out of range for 'model.embed_tokens', which has {VOCAB} rows"),
    ("not-embedding", {"trainable_token_indices": {"lm_head": [1]}}, ConfigError,
     "'lm_head' is a Linear, not an nn.Embedding"),
    ("no-module", {"trainable_token_indices": {"wte": [1]}}, TargetNotFoundError,
     "'wte' matched no module"),
    ("also-lora", {"trainable_token_indices": [1], "targets": ("q_proj", "embed_tokens")},
     ConfigError, "'model.embed_tokens' is also a LoRA target"),
    ("also-saved", {"trainable_token_indices": [1], "modules_to_save": ("embed_tokens",)},
     ConfigError, "is also in modules_to_save"),
]  # fmt: skip


@pytest.mark.parametrize("options, error, message", [c[1:] for c in MODEL_ERRORS],
                         ids=[c[0] for c in MODEL_ERRORS])  # fmt: skip
def test_inject_refuses_what_does_not_fit(options: dict, error: type, message: str) -> None:
    model = tiny_llama(tied=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        lorakit.inject(model, _config(**options))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_tied_head_that_is_a_lora_target_is_refused() -> None:
    model = tiny_llama(tied=True)
    with pytest.raises(ConfigError, match=r"\['lm_head'\] share\(s\) the weight of 'model.embed_"):
        lorakit.inject(model, _config(targets=("q_proj", "lm_head"), trainable_token_indices=[1]))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_a_model_without_input_embedding_is_refused() -> None:
    config = lorakit.LoraConfig(targets=("fc1",), trainable_token_indices=[1])
    with pytest.raises(ConfigError, match="no input embedding found in MLP"):
        lorakit.inject(tiny_mlp(), config)


def test_lora_and_tokens_never_share_a_layer() -> None:
    model = _adapted(False, trainable_token_indices=[1])
    with pytest.raises(UnsupportedLayerError, match="a layer with trainable tokens"):
        lorakit.inject(model, lorakit.LoraConfig(targets=("embed_tokens",)), "lora_on_embedding")
    model = tiny_llama(tied=False)
    lorakit.inject(model, lorakit.LoraConfig(targets=("embed_tokens",)))
    with pytest.raises(UnsupportedLayerError, match="a layer that has LoRA adapters"):
        lorakit.inject(model, _config(trainable_token_indices=[1]), "tokens")


# -- values and gradients ----------------------------------------------------------------------
@TIED
@FORM
def test_a_fresh_adapter_changes_nothing(tied: bool, options: dict) -> None:
    base = tiny_llama(tied)
    model = _adapted(tied, **options)
    torch.testing.assert_close(model_output(model, ids_with_rows()),
                               model_output(base, ids_with_rows()), rtol=0, atol=0)  # fmt: skip


@TIED
def test_forward_uses_the_new_rows(tied: bool) -> None:
    model = _adapted(tied, trainable_token_indices=list(ROWS))
    set_rows(model, seed=1)
    rows = model.model.embed_tokens.lora["default"].delta.detach()
    ids = ids_with_rows()
    out = model.model.embed_tokens(ids)
    base = tiny_llama(tied).model.embed_tokens(ids)
    for position, token in enumerate(ids[0].tolist()):
        want = rows[ROWS.index(token)] if token in ROWS else base[0, position]
        torch.testing.assert_close(out[0, position], want, rtol=0, atol=0)
    if tied:  # the output layer reads the same rows
        hidden = torch.randn(4, model.config.hidden_size)
        torch.testing.assert_close(model.lm_head(hidden), hidden @ _table(model).t())


@TIED
@FORM
def test_a_step_changes_only_the_selected_rows(tied: bool, options: dict) -> None:
    model = _adapted(tied, **options)
    weight_before = model.model.embed_tokens.weight.detach().clone()
    table_before = _table(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model_output(model, ids_with_rows()).square().mean().backward()
    optimizer.step()
    changed = (_table(model) != table_before).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(ROWS)
    assert torch.equal(model.model.embed_tokens.weight, weight_before)  # the base: frozen
    deltas = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert deltas == ["model.embed_tokens.lora.default.delta"]


# -- merge, disable, delete -------------------------------------------------------------------
@TIED
@FORM
def test_merge_writes_the_rows_and_unmerge_restores_them_exactly(tied: bool, options: dict):
    model = _adapted(tied, **options)
    nudge_trainable(model, seed=2)  # the rows and LoRA's B (zero at first)
    weight = model.model.embed_tokens.weight
    before, expected = weight.detach().clone(), model_output(model, ids_with_rows())
    lorakit.merge(model)
    assert torch.equal(weight[list(ROWS)], model.model.embed_tokens.lora["default"].delta)
    torch.testing.assert_close(model_output(model, ids_with_rows()), expected)
    lorakit.unmerge(model)
    assert torch.equal(weight, before)
    torch.testing.assert_close(model_output(model, ids_with_rows()), expected, rtol=0, atol=0)


@TIED
def test_merge_and_unload_gives_plain_layers_with_the_rows(tied: bool) -> None:
    model = _adapted(tied, trainable_token_indices=list(ROWS))
    set_rows(model, seed=3)
    expected = model_output(model, ids_with_rows())
    merged = lorakit.merge_and_unload(model)
    assert type(merged.model.embed_tokens) is nn.Embedding
    assert type(merged.lm_head) is nn.Linear
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied
    torch.testing.assert_close(model_output(merged, ids_with_rows()), expected)


@TIED
def test_disabled_gives_the_base_output(tied: bool) -> None:
    model = _adapted(tied, trainable_token_indices=list(ROWS))
    set_rows(model, seed=4)
    base = model_output(tiny_llama(tied), ids_with_rows())
    for merge_first in (False, True):
        if merge_first:
            lorakit.merge(model)
        with lorakit.disabled(model):
            torch.testing.assert_close(model_output(model, ids_with_rows()), base, rtol=0, atol=0)


@TIED
@pytest.mark.parametrize("how", ["delete", "unload"])
def test_delete_and_unload_restore_the_original_modules(tied: bool, how: str) -> None:
    model = _adapted(tied, trainable_token_indices=list(ROWS))
    set_rows(model, seed=5)
    lorakit.merge(model)
    if how == "delete":
        lorakit.delete_adapter(model, "default")
    else:
        lorakit.unload(model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    base = tiny_llama(tied)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in model.state_dict().items())


def test_two_adapters_with_disjoint_rows_add_up_and_overlapping_ones_are_refused() -> None:
    model = _adapted(False, trainable_token_indices=[1, 2])
    lorakit.inject(model, _config(trainable_token_indices=[3]), "b")
    lorakit.inject(model, _config(trainable_token_indices=[2, 4]), "c")
    set_rows(model, seed=6)
    lorakit.set_active(model, ["default", "b"])
    table = _table(model)
    layer = model.model.embed_tokens
    assert torch.equal(table[[1, 2, 3]], torch.cat([layer.lora["default"].delta,
                                                    layer.lora["b"].delta]))  # fmt: skip
    lorakit.set_active(model, ["default", "c"])
    with pytest.raises(AdapterError, match=r"token indices \[2\] of adapter 'c'"):
        model_output(model, ids_with_rows())
    with pytest.raises(MergeError, match="only disjoint token indices"):
        lorakit.merge(model)


# -- save / load -------------------------------------------------------------------------------
@TIED
@FORM
def test_save_and_load_round_trip(tied: bool, options: dict, tmp_path) -> None:
    model = _adapted(tied, **options)
    nudge_trainable(model, seed=7)
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.load_adapter(tiny_llama(tied), tmp_path)
    torch.testing.assert_close(model_output(loaded, ids_with_rows()),
                               model_output(model, ids_with_rows()), rtol=0, atol=0)  # fmt: skip
    assert isinstance(loaded.model.embed_tokens, TrainableTokensMixin)
    rows = loaded.model.embed_tokens.lora["default"]
    assert isinstance(rows, TokenRows) and rows.token_indices == ROWS


def test_summary_lists_token_rows() -> None:
    text = lorakit.summary(_adapted(True, trainable_token_indices=list(ROWS)))
    assert "model.embed_tokens" in text and "3 tokens" in text


def test_a_file_whose_rows_do_not_fit_is_refused(tmp_path) -> None:
    from tiny_hf import llama_config
    from transformers import LlamaForCausalLM

    lorakit.save_adapter(_adapted(False, trainable_token_indices=list(ROWS)), tmp_path)
    model = LlamaForCausalLM(llama_config(40))  # row 42 is past its end
    with pytest.raises(CheckpointError, match="does not fit this model: .*token id 42"):
        lorakit.load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_routing_and_adapter_algebra_refuse_token_rows() -> None:
    model = _adapted(False, trainable_token_indices=list(ROWS))
    with pytest.raises(UnsupportedLayerError, match="TrainableTokensEmbedding"):
        with lorakit.routing(model, ["default", None]):
            pass
    with pytest.raises(ConfigError, match="trains token rows"):
        lorakit.compress(model, "default", rank=1)
