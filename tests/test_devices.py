"""The fast path, merge and routing on each device: the CPU, and CUDA where there is one.

CI has no GPU, so its CUDA cases are skipped there; GPU sessions run them with
`benchmarks/gpu_run.sh`. References are float64 on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_lora, tiny_llama
from torch import nn

import lorakit
from lorakit.dropout_masks import dropout_mask
from lorakit.fused import fused_lora_linear

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=NO_CUDA)])
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    err = (actual.double().cpu() - expected.double().cpu()).abs().max()
    return float(err / expected.double().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)]
)
@pytest.mark.parametrize("transposed", [False, True])
def test_fused_op_matches_float64(device, dtype, rtol, transposed, merge):
    torch.manual_seed(0)
    n, d_in, d_out, r = 256, 64, 48, 8
    x64 = torch.randn(n, d_in, dtype=torch.float64)
    w64 = torch.randn(d_in, d_out) if transposed else torch.randn(d_out, d_in)
    w64 = w64.double() / 8
    a64, b64 = torch.randn(r, d_in).double() / 8, torch.randn(d_out, r).double() / 8
    g64 = torch.randn(n, d_out, dtype=torch.float64)

    def run(device, dt):
        x = x64.to(device, dt).requires_grad_()
        a, b = a64.to(device, dt).requires_grad_(), b64.to(device, dt).requires_grad_()
        y = fused_lora_linear(
            x, w64.to(device, dt), None, (a,), (b,), (2.0,), transposed=transposed, merge=merge
        )
        y.backward(g64.to(device, dt))
        return y, x.grad, a.grad, b.grad

    for got, want in zip(run(device, dtype), run("cpu", torch.float64)):
        assert got.device.type == device.type and got.dtype == dtype
        assert _rel(got, want) <= rtol * (10 if got.shape[0] != n else 1)


def test_dropout_masks_are_seeded_and_have_the_right_rate(device):
    mask = dropout_mask((1000, 500), 0.1, seed=3, device=device, dtype=torch.float32)
    assert mask.device.type == device.type
    assert abs(float((mask == 0).float().mean()) - 0.1) < 0.005
    assert abs(float(mask.mean()) - 1.0) < 0.01
    again = dropout_mask((1000, 500), 0.1, seed=3, device=device, dtype=torch.float32)
    assert torch.equal(mask, again)


def test_bf16_llama_trains_merges_and_routes(device):
    model = tiny_llama().to(device, torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, dropout=0.1), adapter_name="a")
    lorakit.inject(model, lorakit.LoraConfig(rank=4), adapter_name="b")
    randomise_lora(model)
    ids = torch.randint(0, 100, (4, 12), device=device)
    lorakit.set_active(model, "a")
    model.train()
    model(ids, labels=ids).loss.backward()
    trained = [p for n, p in model.named_parameters() if ".lora.a." in n]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert all(p.dtype == torch.float32 for p in trained)  # adapters keep their own dtype
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits.float()
        lorakit.merge(model)
        merged = model(ids).logits.float()
        lorakit.unmerge(model)
        rows = ["a", "b", None, "a"]
        with lorakit.routing(model, rows):
            routed = model(ids).logits.float()
        lorakit.set_active(model, "b")
        only_b = model(ids[1:2]).logits.float()
    assert _rel(merged, adapted) < 3e-2  # bf16 weights round the merged sum
    assert _rel(routed[0:1], adapted[0:1]) < 3e-2
    assert _rel(routed[1:2], only_b) < 3e-2


@NO_CUDA
def test_compile_fullgraph_on_cuda():  # on the CPU: tests/test_fast_path.py
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(cuda)
    lorakit.inject(block, lorakit.LoraConfig(rank=8, targets=("0", "2")))
    randomise_lora(block)
    x = torch.randn(32, 64, device=cuda, requires_grad=True)
    eager = block(x)
    compiled = torch.compile(block, fullgraph=True)(x)
    assert _rel(compiled, eager) < 1e-4
    compiled.sum().backward()
    assert all(p.grad is not None for p in block.parameters() if p.requires_grad)


@NO_CUDA
def test_compile_reduce_overhead_on_cuda():
    """CUDA graphs (mode="reduce-overhead") of an adapted bf16 block with float32 adapters:
    a train step and an inference call replay and match eager."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    block = block.to(cuda, torch.bfloat16)
    lorakit.inject(block, lorakit.LoraConfig(rank=8, targets=("0", "2")))
    randomise_lora(block)
    params = [p for p in block.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    x = torch.randn(32, 64, device=cuda, dtype=torch.bfloat16, requires_grad=True)

    def step(fn) -> list[torch.Tensor]:
        out = fn(x)
        grads = torch.autograd.grad(out.float().square().sum(), [x, *params])
        return [t.detach().clone() for t in (out, *grads)]

    eager = step(block)
    compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # the first calls compile and record, the later ones replay
        torch.compiler.cudagraph_mark_step_begin()
        got = step(compiled)
    for g, e in zip(got, eager):
        assert _rel(g, e) < 3e-2
    with torch.no_grad():
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(x).clone()
        assert _rel(out, block(x)) < 3e-2
