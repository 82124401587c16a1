"""Compute-dtype copies of the factors (`lorakit.compute_copies`) and the scale on the GEMMs.

The fused path with kept bf16 copies of float32 factors must give the very bits of the same
path casting per call, and the plain path's values to rounding; a copy must follow every
change of its factor and hold no graph.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from conftest import randomise_lora
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig, LoraLayer, compute_copies, inject
from lorakit.compute_copies import compute_copy, copy_of

BF16 = torch.bfloat16
MODES = ("float32", "autocast", "bf16 base")  # autocast: bf16; bf16 base: float32 adapters


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    err = (actual.double() - expected.double()).abs().max()
    assert err <= rtol * expected.double().abs().max().clamp_min(1e-12), float(err)


def _layer(kind: str, n_adapters: int, dropout: float, mode: str) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    nn.init.normal_(base.weight, std=0.3)
    model = nn.Sequential(base)
    for i in range(n_adapters):
        config = LoraConfig(rank=4 + i, alpha=8.0 + 3 * i, dropout=dropout, targets=("0",))
        inject(model, config, adapter_name=f"a{i}")
    lorakit.set_active(model, [f"a{i}" for i in range(n_adapters)])
    randomise_lora(model)
    if mode == "bf16 base":
        model[0].weight.data = model[0].weight.data.to(BF16)
        model[0].bias.data = model[0].bias.data.to(BF16)
    return model[0].train(dropout > 0)


def _factors(layer: nn.Module) -> list[torch.Tensor]:
    return [t for a in layer.lora.values() for t in (a.lora_A, a.lora_B)]


def _run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, mode: str, forward=None):
    """(y, grad x, grads of the factors) of one forward and backward, masks seeded."""
    x = x.detach().to(BF16 if mode == "bf16 base" else torch.float32).requires_grad_()
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=BF16, enabled=mode == "autocast"):
        y = (forward or layer)(x)
    grads = torch.autograd.grad(y, [x, *_factors(layer)], g.to(y.dtype))
    return y.detach(), *grads


def _uncached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compute_copies, "compute_copy", lambda factor, dtype: None)


CASES = [
    (kind, n, p, mode)
    for kind in ("linear", "conv1d")
    for n in (1, 2)
    for p in (0.0, 0.3)
    for mode in MODES
]


@pytest.mark.parametrize(("kind", "n", "p", "mode"), CASES)
def test_kept_copies_give_the_bits_of_per_call_casts(monkeypatch, kind, n, p, mode):
    layer = _layer(kind, n, p, mode)
    torch.manual_seed(1)
    x, g = torch.randn(2, 5, 12), torch.randn(2, 5, 10)
    compute_copies.clear()
    cached = _run(layer, x, g, mode)
    kept = [copy_of(f) for f in _factors(layer)]
    assert all((k is not None) == (mode != "float32") for k in kept)
    assert all(k is None or (k.dtype == BF16 and k.grad_fn is None) for k in kept)
    assert _run(layer, x, g, mode)[0].equal(cached[0])  # a second call: the kept copies
    with monkeypatch.context() as patch:
        _uncached(patch)
        cast = _run(layer, x, g, mode)
    for got, want in zip(cached, cast):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert all(grad.dtype == torch.float32 for grad in cached[2:])  # autograd casts back


@pytest.mark.parametrize(("kind", "n", "mode"), [(k, n, m) for k, n, p, m in CASES if p == 0])
def test_fused_with_the_scale_on_the_gemms_equals_the_plain_path(kind, n, mode):
    layer = _layer(kind, n, 0.0, mode)
    torch.manual_seed(1)
    x, g = torch.randn(3, 12), torch.randn(3, 10)
    fused = _run(layer, x, g, mode)
    plain = _run(layer, x, g, mode, forward=lambda t: LoraLayer.forward(layer, t))
    rtol = 1e-5 if mode == "float32" else 3e-2
    for got, want in zip(fused, plain):
        _close(got, want, rtol if got.shape[0] == 3 else 3 * rtol)  # factor grads: sums


class _Ops(TorchDispatchMode):
    """Counts the aten ops a block dispatches, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "train"])
@pytest.mark.parametrize("mode", ["autocast", "bf16 base"])
def test_a_forward_with_kept_copies_casts_no_factor_and_has_no_scale_op(mode, grad):
    layer = _layer("linear", 2, 0.0, mode)
    x = torch.randn(3, 12, dtype=BF16 if mode == "bf16 base" else torch.float32)
    with torch.autocast("cpu", dtype=BF16, enabled=mode == "autocast"):
        layer(x)  # keeps the copies
        with _Ops() as ops, torch.set_grad_enabled(grad):
            layer(x)
    assert not {"mul", "mul_", "div", "div_"} & set(ops.counts), ops.counts
    casts = 3 if mode == "autocast" else 0  # autocast: x, W and b; never A or B
    assert ops.counts.get("_to_copy", 0) == casts, ops.counts


class _Attention(nn.Module):
    """q, k and v reading one input: linked for shared-input fusion by their names."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(12, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x) + self.k_proj(x) + self.v_proj(x)


def test_the_shared_input_path_has_no_scale_op():
    torch.manual_seed(0)
    model = _Attention()
    inject(model, LoraConfig(rank=4, alpha=12.0, targets=("q_proj", "k_proj", "v_proj")))
    randomise_lora(model)
    assert lorakit.shared_input_groups(model) == (("q_proj", "k_proj", "v_proj"),)
    x = torch.randn(3, 12, requires_grad=True)
    with _Ops() as ops:
        y = model(x)
        y.backward(torch.randn(3, 10))
    assert ops.counts["split_with_sizes"] == 2  # one shared product, one grad GEMM for all three
    assert not {"mul", "mul_", "div", "div_"} & set(ops.counts), ops.counts
    unfused = copy.deepcopy(model)
    lorakit.fuse_shared_inputs(unfused, None)
    _close(y, unfused(x), 1e-5)


def _step_outputs(layer: nn.Module, make_opt, steps: int = 3) -> list[torch.Tensor]:
    """Outputs of a bf16-base layer over optimizer steps on its float32 factors."""
    torch.manual_seed(2)
    x = torch.randn(4, 12, dtype=BF16)
    opt = make_opt(_factors(layer))
    outs = []
    for _ in range(steps):
        y = layer(x)
        outs.append(y.detach())
        y.float().square().sum().backward()
        opt.step()
        opt.zero_grad()
    outs.append(layer(x).detach())
    return outs


def _bnb_adamw(params):
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.AdamW(params, lr=0.05, optim_bits=32)


class _DataWriter(torch.optim.Optimizer):
    """An optimizer writing through `.data`, which no version counter sees."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-group["lr"])


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5),
    "adamw foreach": lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=True),
    "adamw fused": lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
    "bitsandbytes adamw": _bnb_adamw,
    "writes through .data": lambda ps: _DataWriter(ps, lr=0.5),  # the step hook sees it
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_optimizer_step_refreshes_the_copies(monkeypatch, name):
    layer = _layer("linear", 2, 0.0, "bf16 base")
    twin = copy.deepcopy(layer)
    compute_copies.clear()
    first = compute_copy(layer.lora["a0"].lora_A, BF16)
    saved = first.clone()
    cached = _step_outputs(layer, OPTIMIZERS[name])
    assert copy_of(layer.lora["a0"].lora_A) is not first
    assert torch.equal(first, saved)  # an old copy is never written (a backward may hold it)
    with monkeypatch.context() as patch:
        _uncached(patch)
        cast = _step_outputs(twin, OPTIMIZERS[name])
    assert not torch.equal(cached[0], cached[-1])  # the steps changed the output ...
    for got, want in zip(cached, cast):
        assert torch.equal(got, want)  # ... exactly as with per-call casts


def _assign_data(A: torch.Tensor) -> None:
    A.data = A.data * 2  # new storage: another data pointer


def _state_dict_load(A: torch.Tensor, layer: nn.Module) -> None:
    state = {k: v * 2 if k.endswith("a0.lora_A") else v for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)


CHANGES = {
    "copy_": lambda A, layer: A.copy_(A * 2),
    "mul_": lambda A, layer: A.mul_(2),
    "view write": lambda A, layer: A[0].mul_(2),  # a view shares the version counter
    ".data =": lambda A, layer: _assign_data(A),
    "load_state_dict": _state_dict_load,
}


@pytest.mark.parametrize("change", CHANGES)
def test_every_tracked_change_of_a_factor_refreshes_its_copy(change):
    layer = _layer("linear", 1, 0.0, "bf16 base")
    x = torch.randn(3, 12, dtype=BF16)
    with torch.no_grad():
        before = layer(x)
        CHANGES[change](layer.lora["a0"].lora_A, layer)
        after = layer(x)
        compute_copies.clear()
        fresh = layer(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh)


def test_a_write_through_data_needs_clear():
    layer = _layer("linear", 1, 0.0, "bf16 base")
    x = torch.randn(3, 12, dtype=BF16)
    with torch.no_grad():
        before = layer(x)
        layer.lora["a0"].lora_A.data.mul_(2)  # untracked, as for autograd
        assert torch.equal(layer(x), before)  # the documented limit: a stale copy
        compute_copies.clear()
        assert not torch.equal(layer(x), before)


def test_a_reloaded_adapter_gets_its_own_copies(tmp_path):
    model = nn.Sequential(_layer("linear", 1, 0.0, "bf16 base"))
    x = torch.randn(3, 12, dtype=BF16)
    with torch.no_grad():
        first = model(x)
        lorakit.save_adapter(model, tmp_path, "a0")
        model[0].lora["a0"].lora_A.mul_(3)
        lorakit.save_adapter(model, tmp_path / "tripled", "a0")
        lorakit.delete_adapter(model, "a0")
        gc.collect()  # new factors may reuse the old ones' ids and memory
        lorakit.load_adapter(model, tmp_path, "a0")
        assert torch.equal(model(x), first)
        lorakit.delete_adapter(model, "a0")
        gc.collect()
        lorakit.load_adapter(model, tmp_path / "tripled", "a0")
        tripled = model(x)
    assert not torch.equal(tripled, first)
    compute_copies.clear()
    with torch.no_grad():
        assert torch.equal(model(x), tripled)


def test_merge_and_unmerge_keep_the_copies_right():
    layer = _layer("conv1d", 2, 0.0, "bf16 base")
    x = torch.randn(3, 12, dtype=BF16)
    with torch.no_grad():
        adapted = layer(x)
        layer.merge(("a0",))
        half = layer(x)
        layer.unmerge()
        again = layer(x)
    _close(half, adapted, 3e-2)
    compute_copies.clear()
    with torch.no_grad():
        assert torch.equal(layer(x), again)


SKIPPED = {
    "graph result": lambda A: A * 1,
    "view": lambda A: A.detach()[:2],
    "inference tensor": lambda A: _inference_copy(A),
    "meta": lambda A: torch.empty_like(A, device="meta"),
    "subclass": lambda A: torch.Tensor._make_subclass(_Sub, A.detach()),
}


class _Sub(torch.Tensor):
    pass


def _inference_copy(A: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return A.clone()


@pytest.mark.parametrize("kind", SKIPPED)
def test_tensors_the_cache_cannot_check_are_cast_per_call(kind):
    A = nn.Parameter(torch.randn(4, 12))
    assert compute_copy(A, BF16) is not None
    assert compute_copy(SKIPPED[kind](A), BF16) is None


def test_no_copies_under_torch_distributed(tmp_path):
    dist = torch.distributed
    A = nn.Parameter(torch.randn(4, 12))
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert compute_copy(A, BF16) is None  # FSDP2 refills parameters untracked
    finally:
        dist.destroy_process_group()
    assert compute_copy(A, BF16) is not None


def test_no_copies_under_compile():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    inject(block, LoraConfig(rank=4, targets=("0", "2")))
    randomise_lora(block)
    x = torch.randn(2, 5, 16)
    compute_copies.clear()
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=BF16):
        out = compiled(x)
    out.float().sum().backward()
    assert all(copy_of(f) is None for f in _factors(block[0]))  # compiled: cast in the graph
    with torch.autocast("cpu", dtype=BF16):
        eager = block(x)
    assert all(copy_of(f) is not None for f in _factors(block[0]))  # eager: kept
    _close(out, eager, 3e-2)


def test_no_graph_is_kept_alive():
    layer = _layer("linear", 2, 0.0, "bf16 base")
    x = torch.randn(3, 12, dtype=BF16, requires_grad=True)
    hidden = x * 2  # a graph tensor the node saves
    y = layer(hidden)
    refs = [weakref.ref(t) for t in (hidden, y)]
    y.float().sum().backward()
    del hidden, y
    gc.collect()
    assert all(ref() is None for ref in refs)
    kept = [copy_of(f) for f in _factors(layer)]
    assert all(k is not None and k.grad_fn is None and not k.requires_grad for k in kept)


def test_a_copy_made_in_inference_mode_serves_training():
    layer = _layer("linear", 1, 0.0, "bf16 base")
    compute_copies.clear()
    x = torch.randn(3, 12, dtype=BF16)
    with torch.inference_mode():
        layer(x)
    kept = copy_of(layer.lora["a0"].lora_A)
    assert kept is not None and not kept.is_inference()
    layer(x).float().sum().backward()  # saving the kept copy for backward is allowed
    assert layer.lora["a0"].lora_A.grad is not None
