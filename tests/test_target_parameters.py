"""`target_parameters`: LoRA on raw parameters (mixture-of-experts stacks), lorakit's side:
life cycle, merges, state, and the errors (PEFT's refusals among them)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from moe_models import RawBlock, RawNet, raw_features, tiny_mixtral
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit import (
    AdapterError,
    CheckpointError,
    ConfigError,
    TargetNotFoundError,
    UnsupportedLayerError,
)
from lorakit.layers.parameter import ParamLoraLayer

EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def _config(**kwargs: object) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**{"rank": 2, "targets": (), **kwargs})


def _nudged(model: nn.Module, seed: int = 3) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def _adapted(parameters: tuple[str, ...] = ("proj", "stack"), **kwargs: object) -> nn.Module:
    model = RawNet()
    lorakit.inject(model, _config(target_parameters=parameters, **kwargs))
    return _nudged(model)


def test_factors_shapes_and_fresh_adapter_is_a_no_op() -> None:
    model = tiny_mixtral()
    x = torch.randint(0, 64, (1, 5))
    before = model(x).logits
    report = lorakit.inject(model, _config(rank=3, target_parameters=EXPERTS))
    experts = model.model.layers[0].mlp.experts
    gate_up = experts.lora_parameters.gate_up_proj.lora.default
    assert (gate_up.lora_A.shape, gate_up.lora_B.shape) == ((12, 16), (48, 12))
    assert gate_up.rank == 3 and gate_up.num_experts == 4
    assert "model.layers.1.mlp.experts.lora_parameters.down_proj" in report.adapted
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)
    assert not experts.gate_up_proj.requires_grad
    assert "lora_parameters" not in "".join(n for n, _ in tiny_mixtral().named_modules())
    base_keys = set(tiny_mixtral().state_dict())
    assert base_keys <= set(model.state_dict())  # base checkpoints still load


def test_merge_unmerge_exact_and_disabled_gives_the_base() -> None:
    model = _adapted()
    x = raw_features()
    base = RawNet()
    with torch.no_grad():
        adapted = model(x)
        with lorakit.disabled(model):
            torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
        original = model.block.stack.detach().clone()
        lorakit.merge(model)
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-6)
        assert not torch.equal(model.block.stack, original)
        lorakit.unmerge(model)
        assert torch.equal(model.block.stack, original)
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)


def test_unload_gives_back_the_original_classes() -> None:
    model = _adapted()
    lorakit.unload(model)
    assert type(model.block) is RawBlock
    assert set(model.state_dict()) == set(RawNet().state_dict())
    assert not list(lorakit.lora_layers(model))


def test_two_adapters_activate_and_delete() -> None:
    model = _adapted(("stack",))
    lorakit.inject(model, _config(target_parameters=("proj", "stack")), adapter_name="second")
    _nudged(model, seed=4)
    x = raw_features()
    with torch.no_grad():
        second = model(x)
        lorakit.set_active(model, ["default", "second"])
        both = model(x)
        lorakit.set_active(model, "default")
        first = model(x)
    assert not torch.allclose(both, first) and not torch.allclose(both, second)
    lorakit.delete_adapter(model, "second")
    assert list(model.block.lora_parameters) == ["stack"]
    lorakit.delete_adapter(model, "default")
    assert type(model.block) is RawBlock


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["deepcopy", "pickle"])  # fmt: skip
def test_copies_keep_the_adapters(clone) -> None:
    model = _adapted()
    other = clone(model)
    x = raw_features()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    layer = other.block.lora_parameters.stack
    assert layer.lora_holder is other.block
    lorakit.unload(other)
    assert type(other.block) is RawBlock


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _adapted(rank_pattern={"stack": 3})
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.from_pretrained(RawNet(), tmp_path)
    x = raw_features()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.block.lora_parameters.stack.lora.default.rank == 3


def _raise(make, config_kwargs):
    model = make()
    lorakit.inject(model, _config(**config_kwargs))


ERRORS = [
    ("no-match", RawNet, {"target_parameters": ("nothing",)}, TargetNotFoundError,
     r"target_parameters=\['nothing'\] matched no parameter of RawNet"),
    ("no-match-lists-experts", tiny_mixtral, {"target_parameters": ("gate_proj",)},
     TargetNotFoundError, r"experts.gate_up_proj"),
    ("1-d", RawNet, {"target_parameters": ("block.bias",)}, UnsupportedLayerError,
     r"'block.bias' of shape \(10,\).*supports 2-D"),
    ("top-level", RawBlock, {"target_parameters": ("proj",)}, UnsupportedLayerError,
     r"top-level module"),
    ("module-and-parameter", RawNet, {"targets": ("head",), "target_parameters": ("head.weight",)},
     UnsupportedLayerError, r"'head' is adapted as a layer"),
]  # fmt: skip


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_errors_name_the_problem_and_leave_the_model(case) -> None:
    _, make, kwargs, error, message = case
    model = make()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(error, match=message):
        lorakit.inject(model, _config(**kwargs))
    assert not list(lorakit.lora_layers(model))
    assert all(type(m).__name__.startswith("LoRA") is False for m in model.modules())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


CONFIG_ERRORS = [
    ({"target_parameters": "experts.down_proj"}, r"target_parameters must be a list"),
    ({"target_parameters": ["ok", ""]}, r"target_parameters must hold parameter names"),
    ({"target_parameters": ["ok"], "dropout": 0.1}, r"does not work with dropout=0.1"),
    ({"target_parameters": ["ok"], "use_dora": True}, r"does not work with use_dora=True"),
    ({"targets": ()}, r"targets must name at least one module"),
]


@pytest.mark.parametrize("kwargs, message", CONFIG_ERRORS)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lorakit.LoraConfig(**kwargs)


def test_module_target_on_an_adapted_holder_is_refused() -> None:
    model = RawNet()
    lorakit.inject(model, _config(target_parameters=("proj",)))
    with pytest.raises(UnsupportedLayerError, match=r"'block' as a layer: its parameters"):
        lorakit.inject(model, _config(targets=("block",)), adapter_name="other")


def test_mixed_batches_are_refused_as_peft_does() -> None:
    model = _adapted()
    lorakit.inject(model, _config(targets=("head",)), adapter_name="head_only")
    x = raw_features()
    with lorakit.routing(model, ["head_only", None, "head_only"]):
        model(x)  # the routed adapter is not on the parameters: fine
    with lorakit.routing(model, ["default", None, None]):
        with pytest.raises(UnsupportedLayerError, match="mixed-adapter batches"):
            model(x)


def test_peft_file_with_dropout_is_refused(tmp_path: Path) -> None:
    model = _adapted()
    lorakit.save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(weights), weights)  # as PEFT writes it: no lorakit metadata
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"lora_dropout": 0.0', '"lora_dropout": 0.1'))
    with pytest.raises(CheckpointError, match=r"does not work with dropout=0.1"):
        lorakit.from_pretrained(RawNet(), tmp_path)


def test_file_for_another_base_is_refused(tmp_path: Path) -> None:
    lorakit.save_adapter(_adapted(), tmp_path)
    other = RawNet()
    other.block.stack = nn.Parameter(torch.randn(3, 8, 11))
    with pytest.raises(CheckpointError, match=r"'block.stack' weight is \(3, 8, 10\) there"):
        lorakit.from_pretrained(other, tmp_path)


def test_param_layers_are_not_module_targets() -> None:
    model = _adapted()
    with pytest.raises(TargetNotFoundError):
        lorakit.inject(model, _config(targets=("stack",)), adapter_name="other")
    assert all(isinstance(layer, ParamLoraLayer) for _, layer in lorakit.lora_layers(model))
    with pytest.raises(AdapterError):
        lorakit.inject(model, _config(target_parameters=("stack",)), adapter_name="default")


@pytest.mark.parametrize("call", [
    lambda m: lorakit.combine(m, ["default"], [1.0]),
    lambda m: lorakit.compress(m, "default", rank=1),
], ids=["combine", "compress"])  # fmt: skip
def test_adapter_algebra_is_refused_as_peft_does(call) -> None:
    model = _adapted()
    with pytest.raises(ConfigError, match=r"adapts raw parameters \(target_parameters\)"):
        call(model)
