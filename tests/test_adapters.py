"""Many adapters on one model: names, set_active (several add up), delete_adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomise_lora, tiny_llama, tiny_mlp
from torch import nn

import lorakit
from lorakit import AdapterError, LoraConfig, LoraLayer
from lorakit.adapter_registry import adapter_configs
from lorakit.tree import lora_layers


def two_adapters() -> nn.Module:
    """Tiny MLP; adapter "a" on fc2 and head, "b" (rank 2) on head only; both randomised."""
    model = tiny_mlp()
    lorakit.inject(model, LoraConfig(targets=["fc2", "head"]), "a")
    lorakit.inject(model, LoraConfig(rank=2, alpha=3.0, targets=["head"]), "b")
    randomise_lora(model)
    return model


def head_delta(model: nn.Module, name: str, h: torch.Tensor) -> torch.Tensor:
    """s * B (A h) of adapter `name` on the head, from its parameters."""
    a = model.head.lora[name]
    return a.scaling * (h @ a.lora_A.T) @ a.lora_B.T


def head_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = model.head.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    model(x)
    handle.remove()
    return captured[0]


def test_inject_makes_the_new_adapter_the_one_active_and_trainable():
    model = two_adapters()
    assert lorakit.adapter_names(model) == ("a", "b")
    assert lorakit.active_adapters(model) == ("b",)
    assert model.head.lora_active == ("b",) and model.fc2.lora_active == ()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.lora.b.lora_A", "head.lora.b.lora_B"}


def test_set_active_moves_training_to_the_active_adapters():
    model = two_adapters()
    lorakit.set_active(model, ["a"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora.a.lora_{f}" for m in ("fc2", "head") for f in "AB"}


def test_second_inject_keeps_the_first_configs_modules_to_save_training():
    model = tiny_mlp()
    lorakit.inject(model, LoraConfig(targets=["fc2"], modules_to_save=["head"]), "a")
    lorakit.inject(model, LoraConfig(targets=["fc2"]), "b")
    assert model.head.weight.requires_grad and not model.fc1.weight.requires_grad


def test_set_active_two_names_adds_both_deltas():
    model = two_adapters()
    x = torch.randn(5, 8)
    lorakit.set_active(model, "b")  # fc2 carries only "a": now plain there
    assert lorakit.active_adapters(model) == ("b",)
    assert model.fc2.lora_active == ()
    h = head_input(model, x)
    with lorakit.disabled(model):
        base_head = nn.functional.linear(h, model.head.weight, model.head.bias)
    torch.testing.assert_close(model(x), base_head + head_delta(model, "b", h))
    lorakit.set_active(model, ["a", "b"])
    assert lorakit.active_adapters(model) == ("a", "b")
    h = head_input(model, x)  # fc2's adapter "a" is back, so the head sees a new input
    expected = (
        nn.functional.linear(h, model.head.weight, model.head.bias)
        + head_delta(model, "a", h)
        + head_delta(model, "b", h)
    )
    torch.testing.assert_close(model(x), expected)


def test_set_active_nothing_gives_base_outputs():
    model = two_adapters()
    x = torch.randn(5, 8)
    base = tiny_mlp()(x)
    lorakit.set_active(model, [])
    assert lorakit.active_adapters(model) == ()
    assert torch.equal(model(x), base)


def test_set_active_unknown_name_raises():
    model = two_adapters()
    message = r"unknown adapter\(s\) \['zzz'\]; the model has \['a', 'b'\]"
    with pytest.raises(AdapterError, match=message):
        lorakit.set_active(model, ["a", "zzz"])
    assert lorakit.active_adapters(model) == ("b",)  # unchanged


def test_set_active_while_merged_raises():
    model = two_adapters()
    lorakit.merge(model)
    with pytest.raises(AdapterError, match=r"while \['b'\] are merged .*lorakit\.unmerge\(model\)"):
        lorakit.set_active(model, "a")
    lorakit.unmerge(model)
    lorakit.set_active(model, "a")
    assert lorakit.active_adapters(model) == ("a",)


def test_active_adapters_when_adapters_sit_on_different_layers():
    """The first adapted layer may not carry every adapter; the model-wide answer must."""
    model = tiny_mlp()
    lorakit.inject(model, LoraConfig(targets=["fc2"]), "a")
    lorakit.inject(model, LoraConfig(targets=["fc1"]), "b")  # fc1 comes first in the model
    lorakit.set_active(model, ["a", "b"])
    assert lorakit.active_adapters(model) == ("a", "b")
    lorakit.set_active(model, "a")
    assert lorakit.active_adapters(model) == ("a",)


def test_delete_adapter_restores_layers_left_bare():
    model = two_adapters()
    x = torch.randn(5, 8)
    lorakit.set_active(model, "a")
    only_a = model(x)
    lorakit.delete_adapter(model, "b")
    assert lorakit.adapter_names(model) == ("a",)
    assert tuple(model.head.lora) == ("a",)
    assert torch.equal(model(x), only_a)
    lorakit.delete_adapter(model, "a")
    assert lorakit.adapter_names(model) == () and adapter_configs(model) == {}
    assert not list(lora_layers(model))
    for name in ("fc1", "fc2", "head"):
        module = model.get_submodule(name)
        assert type(module) is nn.Linear and not isinstance(module, LoraLayer)
        assert not [k for k in vars(module) if k.startswith("lora")]
    torch.testing.assert_close(model(x), tiny_mlp()(x))


def test_delete_merged_adapter_unmerges_first():
    model = tiny_llama()
    tokens = torch.randint(0, 100, (2, 7))
    base = model(tokens).logits
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lorakit.inject(model, LoraConfig(targets=["q_proj"]))
    randomise_lora(model)
    lorakit.merge(model)
    lorakit.delete_adapter(model, "default")
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear
    torch.testing.assert_close(q.weight.detach(), weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(tokens).logits, base, atol=1e-5, rtol=0)


def test_delete_unknown_adapter_raises():
    model = two_adapters()
    message = r"unknown adapter\(s\) \['c'\]; the model has \['a', 'b'\]"
    with pytest.raises(AdapterError, match=message):
        lorakit.delete_adapter(model, "c")
    assert lorakit.adapter_names(model) == ("a", "b")


def test_a_deleted_name_can_be_injected_again():
    model = two_adapters()
    lorakit.delete_adapter(model, "b")
    lorakit.inject(model, LoraConfig(targets=["fc1"]), "b")
    assert lorakit.adapter_names(model) == ("a", "b")
    assert tuple(model.fc1.lora) == ("b",)


# -- the registry is read from the layers: wrappers, copies, order -------------------------
def test_a_model_wrapped_after_inject_lists_activates_saves_and_deletes_its_adapters(tmp_path):
    model = two_adapters()
    wrapper = nn.Sequential(model)
    x = torch.randn(5, 8)
    assert lorakit.adapter_names(wrapper) == ("a", "b")
    assert adapter_configs(wrapper) == adapter_configs(model)
    lorakit.set_active(wrapper, "a")
    assert lorakit.active_adapters(wrapper) == ("a",) == lorakit.active_adapters(model)
    trainable = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    assert trainable == {f"0.{m}.lora.a.lora_{f}" for m in ("fc2", "head") for f in "AB"}
    with lorakit.disabled(wrapper):
        assert torch.equal(wrapper(x), tiny_mlp()(x))
    lorakit.save_adapter(wrapper, tmp_path, "a")
    fresh = nn.Sequential(tiny_mlp())
    lorakit.load_adapter(fresh, tmp_path, "a")
    assert torch.equal(fresh(x), wrapper(x))
    lorakit.delete_adapter(wrapper, "a")
    assert lorakit.adapter_names(model) == ("b",) and tuple(model.head.lora) == ("b",)
    assert type(model.fc2) is nn.Linear


def test_inject_into_a_wrapper_sees_the_adapters_injected_before_wrapping():
    model = two_adapters()
    wrapper = nn.Sequential(model)
    with pytest.raises(AdapterError, match="adapter 'a' is already on the model"):
        lorakit.inject(wrapper, LoraConfig(targets=["fc1"]), "a")
    lorakit.inject(wrapper, LoraConfig(targets=["fc1"]), "c")
    assert lorakit.adapter_names(model) == ("a", "b", "c")


def test_adapter_names_follow_injection_order_not_layer_order():
    model = tiny_mlp()
    lorakit.inject(model, LoraConfig(targets=["head"]), "late_layer")
    lorakit.inject(model, LoraConfig(targets=["fc1"]), "early_layer")
    assert lorakit.adapter_names(model) == ("late_layer", "early_layer")
    assert lorakit.adapter_names(copy.deepcopy(model)) == ("late_layer", "early_layer")
    lorakit.delete_adapter(model, "late_layer")
    lorakit.inject(model, LoraConfig(targets=["head"]), "late_layer")
    assert lorakit.adapter_names(model) == ("early_layer", "late_layer")
