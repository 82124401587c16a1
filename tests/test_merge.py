"""Merge, unmerge, disabled, unload on tiny real models: the invariants of an explicit merge."""

from __future__ import annotations

import pytest
import torch
from conftest import ModelCase, randomise_lora, tiny_gpt2, tiny_llama, tiny_mlp
from torch import nn

import lorakit
from lorakit import LoRA, LoraConfig, LoraLayer, MergeError
from lorakit.tree import lora_layers


def injected(case: ModelCase, **options) -> nn.Module:
    """A tiny model with a randomised (non-zero) adapter on the case's targets."""
    model = case.make()
    lorakit.inject(model, LoraConfig(targets=case.targets, **options))
    randomise_lora(model)
    return model


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." not in n}


def states(model: nn.Module) -> list[tuple]:
    return [(n, x.lora_active, x.lora_merged, x.lora_disabled) for n, x in lora_layers(model)]


def assert_no_lora_left(model: nn.Module) -> None:
    assert lorakit.adapter_names(model) == ()
    for name, module in model.named_modules():
        assert not isinstance(module, (LoraLayer, LoRA)), name
        assert "lora" not in module._modules, name
        assert not [k for k in vars(module) if k.startswith("lora")], name


def test_merged_equals_adapted(model_case: ModelCase):
    model = injected(model_case)
    adapted = model_case.run(model)
    assert not torch.allclose(adapted, model_case.run(model_case.make()), atol=1e-4)
    assert lorakit.merge(model) is model
    assert all(layer.lora_merged == ("default",) for _, layer in lora_layers(model))
    assert (model_case.run(model) - adapted).abs().max().item() <= 1e-5


def test_merge_unmerge_restores_weights_and_merge_twice_is_once(model_case: ModelCase):
    model = injected(model_case)
    before = base_weights(model)
    lorakit.merge(model)
    once = base_weights(model)
    changed = [n for n in before if not torch.equal(before[n], once[n])]
    assert changed and all(n.endswith("weight") for n in changed)
    lorakit.merge(model)
    for name, value in base_weights(model).items():
        assert torch.equal(value, once[name]), name
    assert lorakit.unmerge(model) is model
    assert all(layer.lora_merged == () for _, layer in lora_layers(model))
    for name, value in base_weights(model).items():
        torch.testing.assert_close(value, before[name], atol=1e-6, rtol=0)


def test_disabled_equals_base_and_state_comes_back(model_case: ModelCase):
    base = model_case.run(model_case.make())
    model = injected(model_case)
    adapted = model_case.run(model)
    before = states(model)
    with lorakit.disabled(model) as same:
        assert same is model
        assert torch.equal(model_case.run(model), base)
    assert states(model) == before
    assert torch.equal(model_case.run(model), adapted)


def test_disabled_unmerges_inside_and_remerges_after(model_case: ModelCase):
    base = model_case.run(model_case.make())
    model = injected(model_case)
    lorakit.merge(model)
    merged = model_case.run(model)
    before = states(model)
    with lorakit.disabled(model):
        assert all(layer.lora_merged == () for _, layer in lora_layers(model))
        torch.testing.assert_close(model_case.run(model), base, atol=1e-5, rtol=0)
    assert states(model) == before
    torch.testing.assert_close(model_case.run(model), merged, atol=1e-5, rtol=0)


def test_disabled_restores_state_after_an_error():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(targets=["q_proj"]))
    before = states(model)
    with pytest.raises(RuntimeError, match="boom"), lorakit.disabled(model):
        raise RuntimeError("boom")
    assert states(model) == before


def test_nested_disabled():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(targets=["q_proj"]))
    before = states(model)
    with lorakit.disabled(model):
        with lorakit.disabled(model):
            pass
        assert all(layer.lora_disabled for _, layer in lora_layers(model))
    assert states(model) == before


def test_merge_and_unload_gives_original_classes_and_adapted_outputs(model_case: ModelCase):
    plain = model_case.make()
    types = {n: type(m) for n, m in plain.named_modules()}
    keys = set(plain.state_dict())
    model = injected(model_case)
    adapted = model_case.run(model)
    assert lorakit.merge_and_unload(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert set(model.state_dict()) == keys
    assert_no_lora_left(model)
    assert (model_case.run(model) - adapted).abs().max().item() <= 1e-5


def test_unload_gives_base_outputs(model_case: ModelCase):
    plain = model_case.make()
    base = model_case.run(plain)
    types = {n: type(m) for n, m in plain.named_modules()}
    model = injected(model_case)
    lorakit.merge(model)  # unload takes merged adapters out first
    assert lorakit.unload(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert_no_lora_left(model)
    torch.testing.assert_close(model_case.run(model), base, atol=1e-5, rtol=0)


def test_merge_two_active_adapters():
    model = tiny_llama()
    tokens = torch.randint(0, 100, (2, 7))
    lorakit.inject(model, LoraConfig(targets=["q_proj", "v_proj"]), "a")
    lorakit.inject(model, LoraConfig(rank=2, targets=["v_proj", "o_proj"]), "b")
    randomise_lora(model)
    lorakit.set_active(model, ["a", "b"])
    adapted = model(tokens).logits
    lorakit.merge(model)
    v = model.model.layers[0].self_attn.v_proj
    assert v.lora_merged == ("a", "b")
    assert (model(tokens).logits - adapted).abs().max().item() <= 1e-5


def test_merge_and_unload_drops_inactive_adapters():
    model = tiny_llama()
    tokens = torch.randint(0, 100, (2, 7))
    lorakit.inject(model, LoraConfig(targets=["q_proj"]), "a")
    lorakit.inject(model, LoraConfig(targets=["q_proj"]), "b")
    randomise_lora(model)
    lorakit.set_active(model, "a")
    only_a = model(tokens).logits
    lorakit.merge_and_unload(model)
    assert_no_lora_left(model)
    assert (model(tokens).logits - only_a).abs().max().item() <= 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_refuses_non_finite_adapter_and_changes_nothing(bad):
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(targets=["q_proj", "v_proj"]))
    randomise_lora(model)
    layer = model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora["default"].lora_B[0, 0] = bad
    before = base_weights(model)
    with pytest.raises(
        MergeError,
        match=r"adapter 'default' of layer 'model\.layers\.1\.self_attn"
        r"\.v_proj' holds NaN or inf; nothing was merged",
    ):
        lorakit.merge(model)
    for name, value in base_weights(model).items():
        assert torch.equal(value, before[name]), name
    assert all(layer.lora_merged == () for _, layer in lora_layers(model))


def test_layer_merge_refuses_overflow():
    """A finite adapter whose delta overflows the base dtype must not write inf."""
    layer = nn.Linear(4, 4).to(torch.float16)
    lorakit.wrap(layer, init="gaussian")
    with torch.no_grad():
        layer.lora["lora"].lora_A.fill_(100.0)
        layer.lora["lora"].lora_B.fill_(100.0)
    before = layer.weight.detach().clone()
    with pytest.raises(MergeError, match="would write NaN or inf into a base weight"):
        layer.merge()
    assert torch.equal(layer.weight, before) and layer.lora_merged == ()


def test_merge_and_unload_every_layer_type(layer_case):
    """Per layer type: merge_and_unload keeps the adapted outputs in a plain base layer."""
    model = nn.Sequential(layer_case.make())
    x = layer_case.make_input()
    lorakit.inject(model, LoraConfig(targets=["0"]))
    randomise_lora(model)
    adapted = model(x)
    lorakit.merge_and_unload(model)
    assert type(model[0]) is layer_case.base_type
    assert_no_lora_left(model)
    assert (model(x) - adapted).abs().max().item() <= 1e-5


def test_unload_every_layer_type(layer_case):
    model = nn.Sequential(layer_case.make())
    x = layer_case.make_input()
    base = model(x)
    lorakit.inject(model, LoraConfig(targets=["0"]))
    randomise_lora(model)
    lorakit.unload(model)
    assert type(model[0]) is layer_case.base_type
    assert_no_lora_left(model)
    assert torch.equal(model(x), base)


def test_merge_refuses_a_tied_weight_and_changes_nothing():
    model = tiny_gpt2()  # wte is tied to lm_head
    lorakit.inject(model, LoraConfig(targets=["wte"]))
    randomise_lora(model)
    before = model.transformer.wte.weight.clone()
    with pytest.raises(MergeError, match=r"'transformer.wte' is tied to \['lm_head'\]"):
        lorakit.merge(model)
    assert torch.equal(model.transformer.wte.weight, before)


def test_merge_inside_disabled_is_refused():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(targets=["q_proj"]))
    with lorakit.disabled(model), pytest.raises(lorakit.AdapterError, match="disabled"):
        lorakit.merge(model)


# -- exact unmerge: the kept original weight --------------------------------------------
def two_adapters(dtype: torch.dtype) -> nn.Module:
    """tiny_mlp in `dtype` with two active, randomised float32 adapters on fc1 and fc2."""
    model = tiny_mlp().to(dtype)
    lorakit.inject(model, LoraConfig(targets=["fc1", "fc2"]), "a")
    lorakit.inject(model, LoraConfig(rank=2, alpha=3.0, targets=["fc1", "fc2"]), "b")
    randomise_lora(model)
    lorakit.set_active(model, ["a", "b"])
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_unmerge_cycles_restore_weights_bitwise(dtype):
    model = two_adapters(dtype)
    x = torch.randn(3, 8, dtype=dtype)
    before, base_out = base_weights(model), _base_output(model, x)
    for _ in range(100):
        lorakit.merge(model)
        with lorakit.disabled(model):  # computes on the exact base weights every time
            assert torch.equal(model(x), base_out)
        lorakit.unmerge(model)
    for name, value in base_weights(model).items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_without_a_copy_stays_within_the_documented_bound(dtype):
    model, cycles = two_adapters(dtype), 100
    before = base_weights(model)
    sizes = {n: sum(x.delta_weight(a).abs() for a in x.lora) for n, x in lora_layers(model)}
    for _ in range(cycles):
        lorakit.merge(model, keep_original=False)
        assert all(x.lora_original is None for _, x in lora_layers(model))
        lorakit.unmerge(model)
    eps = torch.finfo(dtype).eps
    for name, layer in lora_layers(model):
        w0 = before[f"{name}.weight"].float()
        bound = cycles * 2 * eps * (w0.abs() + sizes[name])  # per cycle: eps * (...) per adapter
        assert ((layer.weight.float() - w0).abs() <= bound).all(), name


def test_the_kept_copy_is_not_state_and_is_freed_on_unmerge():
    model = two_adapters(torch.float32)
    keys, before = list(model.state_dict()), base_weights(model)
    lorakit.merge(model)
    assert list(model.state_dict()) == keys
    for name, layer in lora_layers(model):
        assert not torch.equal(layer.weight, before[f"{name}.weight"])  # merged...
        assert torch.equal(layer.lora_original, before[f"{name}.weight"])  # ...copy unmerged
    lorakit.unmerge(model)
    assert all(x.lora_original is None for _, x in lora_layers(model))


def test_unmerging_one_of_two_merged_adapters_is_exact():
    model = two_adapters(torch.float32)
    before = base_weights(model)
    lorakit.merge(model)
    lorakit.delete_adapter(model, "b")  # unmerges b alone: the weight is W + d_a, as merged
    fresh = two_adapters(torch.float32)
    lorakit.delete_adapter(fresh, "b")
    lorakit.merge(fresh)
    for name, value in base_weights(model).items():
        assert torch.equal(value, base_weights(fresh)[name]), name
    lorakit.unmerge(model)
    for name, value in base_weights(model).items():
        assert torch.equal(value, before[name]), name


def test_a_weight_changed_while_merged_is_unmerged_by_subtraction():
    model = two_adapters(torch.float32)
    lorakit.merge(model)
    loaded = model.fc1.weight.detach() + 1.0  # e.g. load_state_dict into the merged model
    model.load_state_dict({**model.state_dict(), "fc1.weight": loaded})
    deltas = model.fc1.delta_weight("a") + model.fc1.delta_weight("b")
    lorakit.unmerge(model)
    torch.testing.assert_close(model.fc1.weight.detach(), loaded - deltas)  # not the stale copy
    assert model.fc1.lora_original is None


def _base_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with lorakit.disabled(model):
        return model(x)
