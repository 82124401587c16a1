"""LoRA layers, table-driven over layer types: no-op start, shapes, merge math, restore, dtype."""

from __future__ import annotations

import copy
import importlib
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import LAYER_CASES, LayerCase, randomise_lora
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import AdapterError, ConfigError, LoRA, LoraConfig, LoraLayer, UnsupportedLayerError
from lorakit.layers import lora_class


def adapt(layer: nn.Module, config: LoraConfig | None = None, name: str = "default") -> LoraLayer:
    """Adapt one layer in place with one adapter, as `inject` does for each target."""
    layer = lora_class(layer).adapt(layer)
    layer.add_adapter(name, config or LoraConfig())
    return layer


def hand_delta(layer: LoraLayer, name: str) -> torch.Tensor:
    """s * B A in the layout of `layer.weight`, computed here without lorakit's helpers."""
    a = layer.lora[name]
    rank = a.lora_A.shape[0]
    dense = a.scaling * (a.lora_B.reshape(a.lora_B.shape[0], rank) @ a.lora_A.reshape(rank, -1))
    if isinstance(layer, (nn.Embedding, Conv1D)):
        return dense.t()  # weights stored (vocab, dim) / (in, out)
    return dense.reshape(layer.weight.shape)


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "zeros"])
def test_fresh_adapter_is_exact_noop(layer_case: LayerCase, init: str):
    layer, x = layer_case.make(), layer_case.make_input()
    expected = layer(x)
    adapt(layer, LoraConfig(init=init))
    assert torch.equal(layer(x), expected)


def test_adapted_layer_keeps_base_type_and_names(layer_case: LayerCase):
    layer = layer_case.make()
    params = dict(layer.named_parameters())
    keys = set(layer.state_dict())
    adapt(layer)
    assert isinstance(layer, layer_case.base_type) and isinstance(layer, LoraLayer)
    for name, p in params.items():
        assert getattr(layer, name) is p
    assert keys <= set(layer.state_dict())
    assert all(k in keys or ".lora_" in k for k in layer.state_dict())


def test_adapter_shapes_follow_peft(layer_case: LayerCase):
    layer = adapt(layer_case.make(), LoraConfig(rank=3))
    a = layer.lora["default"]
    if isinstance(layer, nn.Embedding):
        vocab, dim = layer.weight.shape
        assert a.lora_A.shape == (3, vocab) and a.lora_B.shape == (dim, 3)
    elif isinstance(layer, nn.modules.conv._ConvNd):
        k = tuple(layer.kernel_size)
        assert a.lora_A.shape == (3, layer.in_channels, *k)
        assert a.lora_B.shape == (layer.out_channels, 3, *(1,) * len(k))
    else:
        in_features, out_features = layer.lora_dims()[:2]
        assert a.lora_A.shape == (3, in_features) and a.lora_B.shape == (out_features, 3)
    assert layer.delta_weight("default").shape == layer.weight.shape


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_init_zeroes_one_factor(layer_case: LayerCase, init: str):
    a = adapt(layer_case.make(), LoraConfig(init=init)).lora["default"]
    zero, rand = (a.lora_A, a.lora_B) if a.embedding else (a.lora_B, a.lora_A)
    assert torch.count_nonzero(zero) == 0
    assert torch.count_nonzero(rand) == rand.numel()
    if init == "gaussian":
        assert rand.std().item() == pytest.approx(0.02, rel=0.5)


def test_adapted_equals_hand_computed_merged_weight(layer_case: LayerCase):
    """y = base layer with W + s B A, the reference computed from the parameters by hand."""
    layer, x = layer_case.make(), layer_case.make_input()
    original = copy.deepcopy(layer)
    adapt(layer, LoraConfig(rank=4, alpha=6.0))
    randomise_lora(layer)
    weight = original.weight + hand_delta(layer, "default")
    expected = functional_call(original, {"weight": weight}, (x,))
    y = layer(x)
    assert not torch.allclose(y, original(x), atol=1e-3)  # the delta is not trivially zero
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight("default"), hand_delta(layer, "default"))


def test_merged_equals_adapted(layer_case: LayerCase):
    layer, x = layer_case.make(), layer_case.make_input()
    adapt(layer)
    randomise_lora(layer)
    adapted = layer(x)
    layer.merge()
    assert layer.lora_merged == ("default",)
    assert (layer(x) - adapted).abs().max().item() <= 1e-5


def test_merge_unmerge_restores_weight_and_merge_is_idempotent(layer_case: LayerCase):
    layer = adapt(layer_case.make())
    randomise_lora(layer)
    before = layer.weight.detach().clone()
    layer.merge()
    once = layer.weight.detach().clone()
    assert not torch.allclose(once, before)
    layer.merge()
    assert torch.equal(layer.weight, once)
    layer.unmerge()
    assert layer.lora_merged == ()
    torch.testing.assert_close(layer.weight.detach(), before, atol=1e-6, rtol=0)
    layer.unmerge()  # nothing merged: a no-op
    torch.testing.assert_close(layer.weight.detach(), before, atol=1e-6, rtol=0)


def test_restore_gives_back_the_base_class(layer_case: LayerCase):
    layer, x = layer_case.make(), layer_case.make_input()
    expected = layer(x)
    adapt(layer)
    randomise_lora(layer)
    assert layer.restore() is layer
    assert type(layer) is layer_case.base_type
    assert not [k for k in vars(layer) if k.startswith("lora")]
    assert "lora" not in layer._modules
    assert torch.equal(layer(x), expected)


def test_only_adapter_gets_gradients(layer_case: LayerCase):
    layer, x = layer_case.make(), layer_case.make_input()
    lorakit.wrap(layer)
    randomise_lora(layer)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_two_adapters_add_up(layer_case: LayerCase):
    layer, x = layer_case.make(), layer_case.make_input()
    base = layer(x)
    adapt(layer, LoraConfig(rank=2), "a")
    layer.add_adapter("b", LoraConfig(rank=3, alpha=3.0))
    randomise_lora(layer)
    both = layer(x)
    layer.lora_active = ("a",)
    only_a = layer(x)
    layer.lora_active = ("b",)
    only_b = layer(x)
    torch.testing.assert_close(both - base, (only_a - base) + (only_b - base), atol=1e-5, rtol=0)


def test_duplicate_adapter_on_layer_raises(layer_case: LayerCase):
    layer = adapt(layer_case.make())
    with pytest.raises(lorakit.AdapterError, match="adapter 'default' already exists"):
        layer.add_adapter("default", LoraConfig())


def test_delete_last_adapter_then_restore(layer_case: LayerCase):
    layer, x = layer_case.make(), layer_case.make_input()
    expected = layer(x)
    adapt(layer)
    randomise_lora(layer)
    layer.merge()
    layer.delete_adapter("default")  # unmerges first
    assert layer.lora_active == () and layer.lora_merged == ()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "case",
    [c for c in LAYER_CASES if c.id in ("linear", "gpt2-conv1d", "embedding", "conv2d")],
    ids=lambda c: c.id,
)
@pytest.mark.parametrize(
    ("adapter_dtype", "expected"),
    [(torch.float32, torch.float32), (None, torch.bfloat16), ("float64", torch.float64)],
)
def test_dtype_on_bfloat16_base(case: LayerCase, adapter_dtype, expected):
    layer = case.make().to(torch.bfloat16)
    x = case.make_input()
    x = x if not x.is_floating_point() else x.to(torch.bfloat16)
    base = layer(x)
    adapt(layer, LoraConfig(dtype=adapter_dtype))
    assert {p.dtype for p in layer.lora.parameters()} == {expected}
    assert layer.weight.dtype is torch.bfloat16
    y = layer(x)
    assert y.dtype is torch.bfloat16
    assert torch.equal(y, base)
    randomise_lora(layer)
    assert layer(x).dtype is torch.bfloat16
    layer.merge()
    assert layer.weight.dtype is torch.bfloat16


def test_dropout_is_off_in_eval_and_cheap_module_when_zero():
    torch.manual_seed(0)
    layer = adapt(nn.Linear(6, 5), LoraConfig(dropout=0.5))
    plain = adapt(copy.deepcopy(layer).restore(), LoraConfig())
    assert isinstance(layer.lora["default"].dropout, nn.Dropout)
    assert isinstance(plain.lora["default"].dropout, nn.Identity)
    randomise_lora(layer)
    randomise_lora(plain)
    x = torch.randn(4, 6)
    layer.eval()
    assert torch.equal(layer(x), plain(x))
    layer.train()
    torch.manual_seed(1)
    assert not torch.allclose(layer(x), plain(x))


def test_lora_module_is_the_delta():
    """LoRA(x) = s * B(A(x)) from its own parameters; F.linear twice as the reference."""
    torch.manual_seed(0)
    a = LoRA(6, 5, rank=2, alpha=3.0)
    with torch.no_grad():
        a.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = 1.5 * F.linear(F.linear(x, a.lora_A), a.lora_B)
    torch.testing.assert_close(a(x), expected)
    assert "rank=2" in repr(a) and "scaling=1.5" in repr(a)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_features": 0, "out_features": 5}, "input_size must be a positive integer, got 0"),
        ({"in_features": 6, "out_features": -5}, "output_size must be a positive integer"),
        ({"in_features": 6, "out_features": 5, "rank": 0}, "rank must be a positive integer"),
        ({"in_features": 6, "out_features": 5, "alpha": float("nan")}, "alpha must be a positive"),
        ({"in_features": 6, "out_features": 5, "init": "he"}, "init must be one of"),
        ({"in_features": 6, "out_features": 5, "dropout": 1.5}, r"dropout must be a number"),
        (
            {"in_features": 6, "out_features": 5, "rank": 1, "alpha": 1e5, "dtype": torch.float16},
            r"the scale alpha / rank = 100000 overflows the adapter dtype torch\.float16",
        ),
    ],
)
def test_lora_module_rejects_bad_options(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoRA(**kwargs)


def test_lora_scale_at_the_float16_limit_is_accepted():
    a = LoRA(6, 5, rank=1, alpha=60000.0, dtype=torch.float16)
    assert a.scaling == 60000.0 and not a(torch.randn(2, 6, dtype=torch.float16)).isnan().any()


def test_adapter_that_cannot_be_built_raises_and_leaves_the_layer(layer_case: LayerCase):
    layer = adapt(layer_case.make())
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    message = (
        r"cannot build adapter 'b' with rank=4611686018427387904, dtype=torch\.float32 for a "
        r"weight of shape \(.*\): Storage size calculation overflowed"
    )
    with pytest.raises(AdapterError, match=message):
        layer.add_adapter("b", LoraConfig(rank=2**62))
    assert tuple(layer.lora) == ("default",) and layer.lora_active == ("default",)
    assert list(layer.state_dict()) == list(state)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (nn.LayerNorm(4), "cannot adapt a layer of type LayerNorm"),
        (nn.ReLU(), "cannot adapt a layer of type ReLU"),
        (nn.ConvTranspose2d(3, 4, 3), "cannot adapt a layer of type ConvTranspose2d"),
        (nn.ConvTranspose1d(3, 4, 3), "cannot adapt a layer of type ConvTranspose1d"),
        (nn.Bilinear(3, 3, 3), "cannot adapt a layer of type Bilinear"),
        (nn.LazyLinear(4), "cannot adapt an uninitialised lazy layer LazyLinear"),
        (nn.LazyConv2d(4, 3), "cannot adapt an uninitialised lazy layer LazyConv2d"),
        (nn.Embedding(10, 4, max_norm=1.0), "cannot adapt Embedding with max_norm=1.0"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_lora_class_rejects_unsupported(layer, message):
    with pytest.raises(UnsupportedLayerError, match=message):
        lora_class(layer)


def test_subclass_of_supported_type_keeps_its_forward():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    layer = Scaled(6, 5)
    x = torch.randn(3, 6)
    expected = layer(x)
    adapt(layer)
    assert isinstance(layer, Scaled) and isinstance(layer, LoraLayer)
    assert torch.equal(layer(x), expected)
    assert type(layer.restore()) is Scaled


class _MyLinear(nn.Linear):
    """Subclasses of the base types: adapted through a mixin, which their pickles name."""


class _MyConv2d(nn.Conv2d):
    pass


class _MyEmbedding(nn.Embedding):
    pass


class _MyConv1D(Conv1D):
    pass


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("lorakit.layers.linear", "LinearLora", "LinearLoraMixin"),
        ("lorakit.layers.conv", "ConvLora", "ConvLoraMixin"),
        ("lorakit.layers.embedding", "EmbeddingLora", "EmbeddingLoraMixin"),
        ("lorakit.layers.gpt2", "Conv1DLora", "GPT2Conv1DLoraMixin"),
        ("lorakit.layers.gpt2", "LoRAConv1D", "LoRAGPT2Conv1D"),
    ],
)
def test_a_pickle_naming_a_class_by_its_old_name_still_loads(module, old, new):
    """The renamed mixins and GPT-2 class keep their old names as aliases, so a model pickled
    before the rename (which names e.g. `LinearLora`) loads, as the renamed class."""
    renamed = getattr(importlib.import_module(module), new)
    assert getattr(importlib.import_module(module), old) is renamed
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"linear": _MyLinear(4, 3), "conv": _MyConv2d(2, 3, 3), "embed": _MyEmbedding(5, 4),
         "gpt2": _MyConv1D(3, 4), "plain_gpt2": Conv1D(3, 4)}
    )  # fmt: skip
    for layer in model.values():
        adapt(layer)
    randomise_lora(model)
    data = pickle.dumps(model, protocol=2)  # GLOBAL opcodes: "module\nname\n"
    needle = f"{module}\n{new}\n".encode()
    assert needle in data
    loaded = pickle.loads(data.replace(needle, f"{module}\n{old}\n".encode()))
    assert [type(m) for m in loaded.values()] == [type(m) for m in model.values()]
    assert any(renamed in type(m).__mro__ for m in loaded.values())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    x = torch.randn(2, 4)  # Conv1D(nf=3, nx=4): 4 in, 3 out
    assert torch.equal(loaded["plain_gpt2"](x), model["plain_gpt2"](x))
