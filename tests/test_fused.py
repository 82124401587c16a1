"""The fused LoRA op against the equation written out with plain autograd ops."""

from __future__ import annotations

import pytest
import torch

from lorakit.dropout_masks import dropout_mask
from lorakit.fused import fused_lora_linear, merge_pays

IN, OUT = 12, 10
RTOL = 1e-5


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Relative error against the reference's scale, <= rtol."""
    err = (actual.double() - expected.double()).abs().max()
    assert err <= rtol * expected.double().abs().max().clamp_min(1e-12), float(err)


def _leaf(*shape: int, grad: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _setup(
    n_adapters: int,
    bias: bool,
    transposed: bool,
    shape: tuple[int, ...],
    *,
    w_grad=False,
    b_grad=False,
    dtype=torch.float32,
):
    torch.manual_seed(0)
    x = _leaf(*shape, IN, dtype=dtype)
    weight = (
        _leaf(IN, OUT, grad=w_grad, dtype=dtype)
        if transposed
        else _leaf(OUT, IN, grad=w_grad, dtype=dtype)
    )
    b = _leaf(OUT, grad=b_grad, dtype=dtype) if bias else None
    ranks = (4, 2, 3)[:n_adapters]
    As = tuple(_leaf(r, IN) for r in ranks)
    Bs = tuple(_leaf(OUT, r) for r in ranks)
    scales = (2.0, 0.5, 1.5)[:n_adapters]
    return x, weight, b, As, Bs, scales


def _reference(x, weight, b, As, Bs, scales, masks=None, transposed=False):
    w = weight.t() if transposed else weight
    y = torch.nn.functional.linear(x, w, b)
    for i, (A, B, s) in enumerate(zip(As, Bs, scales)):
        xa = x if masks is None else x * masks[i].view(x.shape)
        y = y + s * (xa @ A.t()) @ B.t()
    return y


def _grads(y, tensors):
    torch.manual_seed(1)
    g = torch.randn_like(y)
    live = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(y, live, g)


CASES = [
    # (n_adapters, bias, transposed, input shape, weight requires grad, bias requires grad)
    (1, True, False, (5,), False, False),
    (1, False, False, (3, 4), False, False),
    (2, True, False, (2, 3), False, True),
    (3, True, True, (2, 3), False, False),
    (1, True, True, (7,), False, True),
    (2, False, True, (4,), False, False),
    (1, True, False, (3,), True, True),
    (2, True, True, (2, 2), True, False),
]


@pytest.mark.parametrize("merge", [False, True, None], ids=["thin", "merged", "auto"])
@pytest.mark.parametrize(("n", "bias", "transposed", "shape", "w_grad", "b_grad"), CASES)
def test_fused_equals_reference(n, bias, transposed, shape, w_grad, b_grad, merge):
    x, weight, b, As, Bs, scales = _setup(n, bias, transposed, shape, w_grad=w_grad, b_grad=b_grad)
    inputs = (x, weight, b, *As, *Bs)
    fused = fused_lora_linear(x, weight, b, As, Bs, scales, transposed=transposed, merge=merge)
    plain = _reference(x, weight, b, As, Bs, scales, transposed=transposed)
    assert fused.shape == plain.shape == (*shape, OUT)
    _close(fused, plain)
    for got, want in zip(_grads(fused, inputs), _grads(plain, inputs)):
        assert got.shape == want.shape and got.dtype == want.dtype
        _close(got, want)


def test_no_grad_for_a_frozen_weight():
    x, weight, b, As, Bs, scales = _setup(1, True, False, (4,))
    y = fused_lora_linear(x, weight, b, As, Bs, scales)
    y.sum().backward()
    assert weight.grad is None and b.grad is None
    assert x.grad is not None and As[0].grad is not None and Bs[0].grad is not None


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_inference_builds_no_graph_and_matches(merge, transposed):
    x, weight, b, As, Bs, scales = _setup(2, True, transposed, (3, 4))
    with torch.no_grad():
        y = fused_lora_linear(x, weight, b, As, Bs, scales, transposed=transposed, merge=merge)
    assert y.grad_fn is None
    want = _reference(x, weight, b, As, Bs, scales, transposed=transposed).detach()
    _close(y, want)


@pytest.mark.parametrize(
    ("tokens", "rows", "cols", "dropout", "dtype", "expected"),
    [
        (2048, 512, 512, 0.0, torch.float32, True),  # N (in + out) = 8 in out
        (1024, 512, 512, 0.0, torch.float32, True),  # the break-even point, 4 in out
        (1023, 512, 512, 0.0, torch.float32, False),
        (1, 4096, 4096, 0.0, torch.float64, False),  # decoding one token: thin is cheaper
        (2048, 512, 512, 0.1, torch.float32, False),  # dropout: x differs per adapter
        (2048, 512, 512, 0.0, torch.bfloat16, False),  # 16-bit W' would lose s B A
        (2048, 512, 512, 0.0, torch.float16, False),
    ],
)
def test_merge_pays_only_when_tokens_outweigh_the_weight(
    tokens, rows, cols, dropout, dtype, expected
):
    weight = torch.empty(rows, cols, dtype=dtype)
    assert merge_pays(tokens, weight, (dropout,)) is expected


def test_merged_path_is_refused_where_it_would_be_wrong():
    """merge=True is a request: with dropout or a 16-bit weight the thin path runs anyway."""
    for dtype, dropout in [(torch.float32, (0.5,)), (torch.bfloat16, (0.0,))]:
        x, weight, b, As, Bs, scales = _setup(1, False, False, (6,), dtype=dtype)
        kw = {"dropout": dropout, "seed": 3}
        with torch.no_grad():
            forced = fused_lora_linear(x, weight, b, As, Bs, scales, merge=True, **kw)
            thin = fused_lora_linear(x, weight, b, As, Bs, scales, merge=False, **kw)
        assert torch.equal(forced, thin)


@pytest.mark.parametrize("x_grad", [True, False], ids=["grad-x", "frozen-x"])
@pytest.mark.parametrize("block", [None, 2 * IN, 5], ids=["one-block", "2-rows", "row-by-row"])
@pytest.mark.parametrize("transposed", [False, True])
def test_fused_dropout_equals_reference_with_the_same_mask(monkeypatch, transposed, block, x_grad):
    """The CPU masks are applied in row blocks of `_BLOCK` entries (at least one row): 15 rows
    in one block, in 8 blocks of 2 and a last of 1, and one row at a time, all equal; with and
    without a gradient for x (a first layer's input needs none)."""
    if block is not None:
        monkeypatch.setattr("lorakit.dropout_masks._BLOCK", block)
    x, weight, b, As, Bs, scales = _setup(2, True, transposed, (3, 5), b_grad=True)
    x.requires_grad_(x_grad)
    ps, seed = (0.3, 0.1), 11
    inputs = (x, weight, b, *As, *Bs)
    fused = fused_lora_linear(
        x, weight, b, As, Bs, scales, dropout=ps, seed=seed, transposed=transposed
    )
    masks = [dropout_mask((15, IN), p, seed + i, x.device, x.dtype) for i, p in enumerate(ps)]
    plain = _reference(x, weight, b, As, Bs, scales, masks, transposed=transposed)
    _close(fused, plain)
    for got, want in zip(_grads(fused, inputs), _grads(plain, inputs)):
        _close(got, want)


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float64, 1e-12), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)]
)
def test_fused_dropout_blocks_in_every_float_dtype(monkeypatch, dtype, rtol):
    """The block-wise masking (2 rows a block here) in 16-bit and float64: outputs and
    gradients agree with the float64 reference under the same masks, to the dtype's rounding."""
    monkeypatch.setattr("lorakit.dropout_masks._BLOCK", 2 * IN)
    x, weight, b, As, Bs, scales = _setup(2, True, False, (3, 5), b_grad=True, dtype=dtype)
    ps, seed = (0.3, 0.1), 11
    fused = fused_lora_linear(x, weight, b, As, Bs, scales, dropout=ps, seed=seed)
    assert fused.dtype == dtype
    masks = [dropout_mask((15, IN), p, seed + i, x.device, torch.float64) for i, p in enumerate(ps)]
    exact = [t.detach().double().requires_grad_() for t in (x, weight, b, *As, *Bs)]
    plain = _reference(*exact[:3], exact[3:5], exact[5:], scales, masks)
    _close(fused, plain, rtol)
    live = (x, b, *As, *Bs)
    got = _grads(fused.double(), live)
    want = _grads(plain, [exact[0], exact[2], *exact[3:]])
    for g_got, g_want in zip(got, want):  # sums over tokens: more roundings; the factors'
        _close(g_got, g_want, max(rtol * 10, 1e-6))  # gradients come back in float32


def test_fused_dropout_without_a_seed_draws_from_the_global_generator():
    """seed=None (what the layers pass): masks come from torch's global generator, as
    nn.Dropout's, so torch.manual_seed replays them; outputs and gradients match."""
    x, weight, b, As, Bs, scales = _setup(2, True, False, (3, 5), b_grad=True)
    ps = (0.3, 0.1)
    inputs = (x, weight, b, *As, *Bs)
    torch.manual_seed(4)
    fused = fused_lora_linear(x, weight, b, As, Bs, scales, dropout=ps)
    after = torch.rand(3)
    torch.manual_seed(4)
    masks = [dropout_mask((15, IN), p, None, x.device, x.dtype) for p in ps]
    assert torch.equal(torch.rand(3), after)  # the same draws, in the same order
    plain = _reference(x, weight, b, As, Bs, scales, masks)
    _close(fused, plain)
    for got, want in zip(_grads(fused, inputs), _grads(plain, inputs)):
        _close(got, want)
    assert not torch.equal(fused, fused_lora_linear(x, weight, b, As, Bs, scales, dropout=ps))


def test_dropout_changes_the_output_in_expectation_only():
    x, weight, b, As, Bs, scales = _setup(1, False, False, (64,))
    with torch.no_grad():
        clean = fused_lora_linear(x, weight, b, As, Bs, scales)
        runs = torch.stack(
            [
                fused_lora_linear(x, weight, b, As, Bs, scales, dropout=(0.2,), seed=s)
                for s in range(400)
            ]
        )
    assert not torch.equal(runs[0], clean)
    _close(runs.mean(0), clean, rtol=0.05)


def test_bf16_base_with_float32_adapters():
    x, weight, b, As, Bs, scales = _setup(2, True, False, (2, 3), dtype=torch.bfloat16)
    y = fused_lora_linear(x, weight, b, As, Bs, scales)
    assert y.dtype == torch.bfloat16
    want = _reference(x.float(), weight.float(), b.float(), As, Bs, scales)
    _close(y.float(), want, rtol=3e-2)
    y.float().square().sum().backward()
    assert As[0].grad.dtype == torch.float32 and Bs[1].grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16
    assert all(torch.isfinite(t.grad).all() for t in (x, *As, *Bs))


def test_autocast_computes_in_the_autocast_dtype():
    x, weight, b, As, Bs, scales = _setup(1, True, False, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_lora_linear(x, weight, b, As, Bs, scales)
    assert y.dtype == torch.bfloat16
    _close(y.float(), _reference(x, weight, b, As, Bs, scales).detach(), rtol=3e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and As[0].grad.dtype == torch.float32


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_backward_keeps_x_itself_thin_products_and_byte_masks(dropout):
    """Saved for backward: x (the caller's tensor), (N, r) products, with dropout a bool mask."""
    tokens, rank = 64, 4
    x = _leaf(tokens, IN)
    weight = torch.randn(OUT, IN)
    A, B = _leaf(rank, IN), _leaf(OUT, rank)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fused_lora_linear(x, weight, None, (A,), (B,), (2.0,), dropout=(dropout,), merge=False)
    big = [t for t in saved if t.numel() >= tokens * IN]
    assert [t.data_ptr() for t in big if t.is_floating_point()] == [x.data_ptr()]
    assert [t.dtype for t in big if not t.is_floating_point()] == ([torch.bool] if dropout else [])
    assert any(t.shape == (tokens, rank) for t in saved)
    y.sum().backward()
    assert x.grad is not None and A.grad is not None and B.grad is not None


def test_fused_dropout_kernel_path_equals_reference_with_its_mask(monkeypatch):
    """The CUDA branch (`native_dropout` from the global generator), run here on the CPU:
    replaying the generator gives its masks, and outputs and gradients match the reference."""
    monkeypatch.setattr("lorakit.fused._FUSED_DROPOUT_DEVICES", ("cpu",))
    x, weight, b, As, Bs, scales = _setup(2, True, False, (3, 5), b_grad=True)
    ps = (0.3, 0.1)
    inputs = (x, weight, b, *As, *Bs)
    torch.manual_seed(5)
    fused = fused_lora_linear(x, weight, b, As, Bs, scales, dropout=ps, seed=0)
    torch.manual_seed(5)
    x2 = x.detach().reshape(-1, IN)
    masks = [torch.native_dropout(x2, p, True)[1].float() / (1 - p) for p in ps]
    plain = _reference(x, weight, b, As, Bs, scales, masks)
    _close(fused, plain)
    for got, want in zip(_grads(fused, inputs), _grads(plain, inputs)):
        _close(got, want)
