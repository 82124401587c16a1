"""`lorakit.fused_quantized`: the fused path over a 4-bit base equals the plain path."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_lora
from qlora_models import IN, quantized_mlp
from torch import nn

import lorakit
from lorakit.fused_quantized import fusable_adapters
from lorakit.layers.base import LoraLayer

FLOAT_KINDS = ["nf4", "nf4-double", "fp4"]  # weights quantized from float32, float32 compute


def adapted(kind: str, adapters: int = 1, dropout: float = 0.0, **config) -> nn.Sequential:
    model = quantized_mlp(kind)
    cfg = lorakit.LoraConfig(targets=("0", "2"), rank=4, alpha=8, dropout=dropout, **config)
    for i in range(adapters):
        lorakit.inject(model, cfg, adapter_name=f"a{i}")
    randomise_lora(model)
    lorakit.set_active(model, [f"a{i}" for i in range(adapters)])
    return model


def assert_near(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to float32 rounding: the fused path sums the same terms in another order."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def plain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output through the plain path of every adapted layer."""
    h = LoraLayer.forward(model[0], x)
    return LoraLayer.forward(model[2], model[1](h))


def outputs_and_grads(model: nn.Module, x: torch.Tensor, fn) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.pow(2).sum().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    result = [y.detach(), x.grad, *(p.grad.clone() for p in params)]
    model.zero_grad(set_to_none=True)
    return result


@pytest.mark.parametrize("kind", FLOAT_KINDS)
@pytest.mark.parametrize("tokens", [3, 400])  # thin products / W' folded (fused.merge_pays)
@pytest.mark.parametrize("adapters", [1, 2])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_fused_equals_plain_in_value_and_gradient(kind, tokens, adapters, lora_bias):
    model = adapted(kind, adapters, lora_bias=lora_bias)
    if lora_bias:
        for layer in (model[0], model[2]):
            for adapter in layer.lora.values():
                nn.init.normal_(adapter.lora_bias)
    x = torch.randn(tokens, IN, generator=torch.Generator().manual_seed(2))
    assert fusable_adapters(model[0], x)  # the fused path is the one under test
    fused = outputs_and_grads(model, x, model)
    reference = outputs_and_grads(model, x, lambda t: plain(model, t))
    n_params = 2 * 2 * adapters + (2 * adapters if lora_bias else 0)  # A, B (and b) per layer
    assert len(fused) == len(reference) == 2 + n_params
    for got, want in zip(fused, reference):
        assert_near(got, want)


def test_no_float_copy_of_the_weight_is_kept_for_the_backward():
    model = adapted("nf4")
    layer = model[0]
    saved = []
    x = torch.randn(400, IN, requires_grad=True)
    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    weight_shape = (layer.out_features, layer.in_features)
    assert saved and weight_shape not in saved
    y.sum().backward()
    assert layer.lora["a0"].lora_A.grad is not None and x.grad is not None


def test_dropout_trains_through_the_fused_path_and_eval_equals_plain():
    model = adapted("nf4", dropout=0.3)
    x = torch.randn(50, IN)
    assert fusable_adapters(model[0], x)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        assert_near(model(x), plain(model, x))


def _bf16_compute(model):
    model[0].compute_dtype = torch.bfloat16


def _disabled(model):
    model[0].lora_disabled = True


@pytest.mark.parametrize(
    "kind, change",
    [
        ("nf4-bf16", None),  # a 16-bit compute dtype: the plain path keeps float32 adapters
        ("fp4-bf16", None),
        ("nf4", _bf16_compute),
        ("nf4", _disabled),
    ],
)
def test_plain_path_where_the_fused_one_does_not_apply(kind, change):
    model = adapted(kind)
    if change is not None:
        change(model)
    assert fusable_adapters(model[0], torch.randn(4, IN)) == []


def test_plain_path_under_autocast_and_for_integer_inputs():
    model = adapted("nf4")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fusable_adapters(model[0], torch.randn(4, IN)) == []
    assert fusable_adapters(model[0], torch.ones(4, IN, dtype=torch.long)) == []


def test_inference_builds_no_graph_and_matches_the_plain_path():
    model = adapted("nf4")
    x = torch.randn(400, IN)
    with torch.no_grad():
        fused = model(x)
        reference = plain(model, x)
    assert fused.grad_fn is None
    assert_near(fused, reference)


@pytest.mark.parametrize("tokens", [3, 400])  # the two-node thin path; the folded node
def test_no_float_weight_is_saved_on_either_path(tokens):
    model = adapted("nf4")
    layer = model[0]
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(torch.randn(tokens, IN, requires_grad=True))
    assert saved and (layer.out_features, layer.in_features) not in saved
    y.sum().backward()


def _count_dequantizations(monkeypatch) -> list[int]:
    import lorakit.fused_quantized as fq

    calls = [0]
    real = fq.dequantize_4bit

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(fq, "dequantize_4bit", counting)
    return calls


def test_checkpoint_recomputation_stops_before_the_last_base(monkeypatch):
    """Under non-reentrant checkpointing the block's last adapted 4-bit layer is not
    dequantized (nor multiplied) again: its low-rank node saves everything first."""
    from torch.utils.checkpoint import checkpoint

    model = adapted("nf4")
    x = torch.randn(3, IN)
    reference = outputs_and_grads(model, x, model)
    calls = _count_dequantizations(monkeypatch)
    got = outputs_and_grads(model, x, lambda t: checkpoint(model, t, use_reentrant=False))
    for a, b in zip(got, reference):
        assert_near(a, b)
    # forward 2 layers + recompute of the first only + backward of both
    assert calls[0] == 2 + 1 + 2
