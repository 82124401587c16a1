"""Adapted Linear / GPT-2 Conv1D layers take the fused path, and it equals the plain path."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_lora, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
import lorakit.layers.linear as linear_module
from lorakit import LoraConfig, LoraLayer, inject
from lorakit.fused import merge_pays

RTOL = 1e-5


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    err = (actual.double() - expected.double()).abs().max()
    assert err <= rtol * expected.double().abs().max().clamp_min(1e-12), float(err)


class _Counter:
    """Wraps `fused_lora_linear` to count the calls the layers make to it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._fused = linear_module.fused_lora_linear
        monkeypatch.setattr(linear_module, "fused_lora_linear", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._fused(*args, **kwargs)


def _plain(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return LoraLayer.forward(layer, x)  # the plain path, whatever the layer's own forward does


def _layer(kind: str, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 10, bias=bias)
    layer = Conv1D(10, 12)  # always has a bias
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def _adapted(kind: str, bias: bool, n_adapters: int, bias_mode: str, dropout=0.0) -> nn.Module:
    model = nn.Sequential(_layer(kind, bias))
    for i in range(n_adapters):
        config = LoraConfig(
            rank=4 + i, alpha=8.0 + i, bias=bias_mode, dropout=dropout, targets=("0",)
        )
        inject(model, config, adapter_name=f"a{i}")
    lorakit.set_active(model, [f"a{i}" for i in range(n_adapters)])
    randomise_lora(model)
    return model[0]


def _params(layer: nn.Module) -> list[torch.Tensor]:
    return [p for p in layer.parameters() if p.requires_grad]


CASES = [
    (kind, bias, n, mode, shape)
    for kind in ("linear", "conv1d")
    for bias, mode in ((True, "none"), (False, "none"), (True, "lora_only"))
    for n in (1, 2)
    for shape in ((5,), (2, 3))
    if bias or kind == "linear"
]


@pytest.mark.parametrize(("kind", "bias", "n", "bias_mode", "shape"), CASES)
def test_fused_equals_plain(monkeypatch, kind, bias, n, bias_mode, shape):
    layer = _adapted(kind, bias, n, bias_mode)
    assert layer.lora_active == tuple(f"a{i}" for i in range(n))
    counter = _Counter(monkeypatch)
    torch.manual_seed(1)
    x = torch.randn(*shape, 12, requires_grad=True)
    g = torch.randn(*shape, 10)
    params = _params(layer)
    assert (layer.bias is not None and layer.bias.requires_grad) == (bias_mode == "lora_only")
    fused = layer(x)
    assert counter.calls == 1
    plain = _plain(layer, x)
    _close(fused, plain)
    for got, want in zip(
        torch.autograd.grad(fused, [x, *params], g), torch.autograd.grad(plain, [x, *params], g)
    ):
        _close(got, want)


def test_the_plain_path_runs_when_the_fused_one_cannot(monkeypatch):
    layer = _adapted("linear", True, 2, "none")
    counter = _Counter(monkeypatch)
    x = torch.randn(3, 12)
    layer.lora_disabled = True
    torch.testing.assert_close(layer(x), nn.Linear.forward(layer, x), rtol=0, atol=0)
    layer.lora_disabled = False
    layer.merge()
    merged = layer(x)  # all adapters merged: the base forward, exactly
    torch.testing.assert_close(merged, nn.Linear.forward(layer, x), rtol=0, atol=0)
    assert counter.calls == 0
    layer.unmerge(("a1",))  # one merged, one not: the fused path adds only the unmerged one
    _close(layer(x), _plain(layer, x))
    assert counter.calls == 1
    layer.lora_routing = object()  # mixed-batch routing is the plain path's business
    assert layer._fused_adapters(x) == []
    layer.lora_routing = None
    assert layer._fused_adapters(x.double()) == []  # a dtype the base would reject
    assert layer._fused_adapters(x) == [layer.lora["a1"]]


class _ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward, which only the plain path knows to call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_subclass_with_its_own_forward_keeps_it(monkeypatch):
    model = nn.Sequential(_ScaledLinear(4, 3))
    inject(model, LoraConfig(targets=("0",)))
    randomise_lora(model)
    counter = _Counter(monkeypatch)
    x = torch.randn(2, 4)
    assert torch.equal(model(x), _plain(model[0], x))
    assert counter.calls == 0


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dropout_trains_with_the_fused_path_and_is_off_in_eval(monkeypatch, kind):
    layer = _adapted(kind, True, 1, "none", dropout=0.5)
    counter = _Counter(monkeypatch)
    x = torch.randn(64, 12)
    layer.train()
    torch.manual_seed(5)
    a = layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), a)  # masks follow torch.manual_seed
    assert not torch.equal(layer(x), a)
    layer.eval()
    _close(layer(x), _plain(layer, x))
    assert counter.calls == 4


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_models_train_the_same_on_both_paths(make):
    model = make()
    inject(model, LoraConfig(rank=4, bias="lora_only"))
    inject(model, LoraConfig(rank=2, targets=("c_attn", "q_proj", "v_proj")), adapter_name="b")
    lorakit.set_active(model, ["default", "b"])
    randomise_lora(model)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> tuple[torch.Tensor, ...]:
        loss = model(ids, labels=ids).loss
        return (loss.detach(), *torch.autograd.grad(loss, params))

    fused = step()
    mixin = linear_module.LinearLoraMixin
    mixin.forward, saved = LoraLayer.forward, mixin.forward
    try:
        plain = step()
    finally:
        mixin.forward = saved
    for got, want in zip(fused, plain):
        _close(got, want, rtol=1e-4)  # whole-model sums: a few roundings more than one layer


def test_bf16_layer_with_float32_adapters_smoke():
    layer = _adapted("linear", True, 2, "lora_only").to(torch.bfloat16)
    for adapter in layer.lora.values():
        adapter.float()
    x = torch.randn(3, 12, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    _close(y.float(), _plain(layer, x).float(), rtol=3e-2)
    y.float().square().sum().backward()
    grads = [p.grad for p in _params(layer)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert layer.lora["a0"].lora_A.grad.dtype == torch.float32


DTYPE_CASES = [
    # (layer dtype, tolerance against float64, tokens: 4 take the thin path, 128 the fold)
    (torch.float64, 1e-12, 4),
    (torch.float64, 1e-12, 128),
    (torch.float32, 1e-5, 4),
    (torch.float32, 1e-5, 128),
    (torch.bfloat16, 3e-2, 128),  # 16-bit: always thin
    (torch.float16, 3e-3, 128),
]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize(("dtype", "rtol", "tokens"), DTYPE_CASES)
def test_fast_path_in_every_float_dtype_matches_float64(kind, dtype, rtol, tokens):
    """The whole layer (base, adapters, inputs) in one dtype: outputs and every gradient
    agree with the same layer in float64, to that dtype's rounding."""
    layer = _adapted(kind, True, 2, "none").to(dtype)
    exact = _adapted(kind, True, 2, "none").double()
    folds = tokens == 128 and dtype in (torch.float32, torch.float64)
    assert merge_pays(tokens, layer.weight, (0.0,)) is folds
    torch.manual_seed(3)
    x64 = torch.randn(tokens, 12, dtype=torch.float64)
    x = x64.to(dtype).clone().requires_grad_()
    x_exact = x64.clone().requires_grad_()
    g = torch.randn(tokens, 10, dtype=torch.float64)
    y, y_exact = layer(x), exact(x_exact)
    assert y.dtype == dtype
    _close(y, y_exact, rtol)
    y.backward(g.to(dtype))
    y_exact.backward(g)
    _close(x.grad, x_exact.grad, rtol)
    for got, want in zip(_params(layer), _params(exact)):
        assert got.grad.dtype == dtype
        _close(got.grad, want.grad, rtol * 10)  # sums over tokens: more roundings


def test_compile_fullgraph_on_an_adapted_block():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 32), nn.GELU(), Conv1D(16, 32))
    inject(block, LoraConfig(rank=4, bias="lora_only", targets=("0", "2")))
    randomise_lora(block)
    x = torch.randn(2, 5, 16, requires_grad=True)
    params = [p for p in block.parameters() if p.requires_grad]
    eager = block(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, *params])
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    _close(out, eager, rtol=1e-4)
    for got, want in zip(grads, eager_grads):
        _close(got, want, rtol=1e-4)


def test_compile_fullgraph_with_dropout_in_training():
    # Seeded masks need a Python int, so under compile the layer takes the plain path, whose
    # nn.Dropout compiles; what matters is that nothing breaks the graph.
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    inject(block, LoraConfig(rank=4, dropout=0.2))
    randomise_lora(block)
    block.train()
    x = torch.randn(2, 5, 16)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    assert out.shape == (2, 5, 16)
    assert all(p.grad is not None for p in block.parameters() if p.requires_grad)
    block.eval()
    with torch.no_grad():
        _close(compiled(x), block(x), rtol=1e-5)  # eval: no dropout, both paths agree


@pytest.mark.parametrize("shape", [(12,), (0, 12), (2, 0, 12)], ids=["1d", "empty", "empty-3d"])
def test_odd_input_shapes(shape):
    layer = _adapted("linear", True, 1, "none")
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], 10)
    if y.numel():
        _close(y, _plain(layer, x))
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_meta_device_layers_run():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(12, 10))
    inject(model, LoraConfig(targets=("0",)))
    assert model(torch.empty(3, 12, device="meta")).shape == (3, 10)


DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_compile_fullgraph_on_a_llama_decoder_layer(autocast):
    """A whole decoder layer, LoRA on every linear layer, compiles as one graph with inductor
    and matches eager; shared-input fusion (on, eager) stands aside under compile."""
    model = tiny_llama()
    inject(model, LoraConfig(rank=4, targets=DECODER_TARGETS))
    randomise_lora(model)
    assert lorakit.shared_input_groups(model)  # q/k/v and gate/up linked
    block = model.model.layers[0]
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 32, requires_grad=True)
    cos_sin = model.model.rotary_emb(hidden, torch.arange(7).unsqueeze(0))
    params = [p for p in block.parameters() if p.requires_grad]
    assert len(params) == 2 * len(DECODER_TARGETS)

    def run(fn) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(hidden, position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
        return out, torch.autograd.grad(out.float().square().sum(), [hidden, *params])

    eager, eager_grads = run(block)
    torch._dynamo.reset()
    compiled, grads = run(torch.compile(block, fullgraph=True))
    assert compiled.dtype == eager.dtype  # the float32 residual stream, autocast or not
    rtol = 3e-2 if autocast else 1e-4
    _close(compiled, eager, rtol)
    for got, want in zip(grads, eager_grads):
        _close(got, want, 2 * rtol)
