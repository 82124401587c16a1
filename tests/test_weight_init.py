"""Inits from the base weight (PiSSA, OLoRA, MiCA) and orthogonal: what defines each, the
residual base, save / load / merge / unload, the conversion for the original base, errors.
(Against the real `peft` package: tests/test_weight_init_peft.py.)"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft_cross import features, model_output, tokens
from torch import Tensor, nn

import lorakit
from lorakit import AdapterError, ConfigError, UnsupportedLayerError

ATOL = 1e-5
MOVING = ("pissa", "pissa_niter_4", "olora")  # inits that rewrite the base weight
ALL_INITS = (*MOVING, "mica", "orthogonal")


class MLP(nn.Module):
    """Two Linears (with and without bias) and a conv the inits refuse."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin1 = nn.Linear(12, 16)
        self.lin2 = nn.Linear(16, 10, bias=False)
        self.conv = nn.Conv1d(1, 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(torch.tanh(self.lin1(x)))


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], nn.Module]
    targets: tuple[str, ...]
    x: Callable[[], Tensor]


CASES = [
    Case("linear", MLP, ("lin1", "lin2"), features),
    Case("gpt2-conv1d", tiny_gpt2, ("c_attn", "c_proj", "c_fc"), tokens),
]


def _config(init: str, targets: tuple[str, ...], **kw: object) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(rank=4, alpha=8, targets=targets, init=init, **kw)  # type: ignore[arg-type]


def _train(model: nn.Module, seed: int = 5) -> None:
    """Every trainable tensor moved, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def _matrix(layer: nn.Module) -> Tensor:
    """The layer's weight as (out, in)."""
    return layer.to_weight_layout(layer.weight.detach())


@pytest.mark.parametrize("init", ALL_INITS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_output_unchanged_at_init(case: Case, init: str) -> None:
    x, model = case.x(), case.make()
    before = model_output(model, x)
    torch.manual_seed(3)
    lorakit.inject(model, _config(init, case.targets))
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, x), before, rtol=0, atol=ATOL)


@pytest.mark.parametrize("init", MOVING)
def test_base_becomes_residual(init: str) -> None:
    """W_res + s B0 A0 = W; B0 A0 is the top-r SVD truncation (PiSSA) or Q_r R_r (OLoRA)."""
    original = MLP().lin1.weight.detach().clone()
    model = MLP()
    lorakit.inject(model, _config(init, ("lin1",)))
    layer = model.lin1
    adapter = layer.lora["default"]
    delta = adapter.delta_weight()
    torch.testing.assert_close(layer.weight + delta, original, rtol=0, atol=ATOL)
    assert not torch.allclose(layer.weight, original, atol=1e-3)
    torch.testing.assert_close(adapter.initial_A, adapter.lora_A)
    torch.testing.assert_close(adapter.initial_B, adapter.lora_B)
    if init == "olora":
        B, A = adapter.lora_B.detach(), adapter.lora_A.detach()
        torch.testing.assert_close(B.t() @ B, torch.eye(4), rtol=0, atol=ATOL)  # Q's columns
        torch.testing.assert_close(A[:, :4], A[:, :4].triu())  # R is upper triangular
        return
    assert torch.linalg.matrix_rank(delta) == 4
    if init != "pissa":
        return  # a fast SVD of 4 iterations without oversampling (PEFT's): close, not exact
    U, S, Vh = torch.linalg.svd(original)
    truncation = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    torch.testing.assert_close(delta, truncation, rtol=0, atol=ATOL)
    # the residual keeps the minor directions: its largest singular value is W's 5th
    top = torch.linalg.svdvals(layer.weight.detach())[0]
    torch.testing.assert_close(top, S[4], rtol=0, atol=ATOL)


MICA_CASES = [*CASES, Case("embedding", tiny_llama, ("embed_tokens",), tokens)]


@pytest.mark.parametrize("case", MICA_CASES, ids=[c.id for c in MICA_CASES])
def test_mica_trains_a_only(case: Case) -> None:
    """B = the r least singular directions of W (orthonormal), A = 0, B frozen."""
    model = case.make()
    lorakit.inject(model, _config("mica", case.targets))
    for _, layer in lorakit.lora_layers(model):
        adapter = layer.lora["default"]
        B, W = adapter.lora_B.detach(), _matrix(layer)
        assert not adapter.lora_A.any() and adapter.lora_A.requires_grad
        assert not adapter.lora_B.requires_grad
        torch.testing.assert_close(B.t() @ B, torch.eye(4), rtol=0, atol=ATOL)
        S = torch.linalg.svdvals(W)
        projected = torch.linalg.matrix_norm(B.t() @ W)  # W's energy along B: the last 4
        torch.testing.assert_close(projected, S[-4:].norm(), rtol=1e-4, atol=ATOL)
    lorakit.inject(model, _config("kaiming", case.targets), "other")
    lorakit.set_active(model, ["default", "other"])  # re-freezing keeps MiCA's B frozen
    assert all(not layer.lora["default"].lora_B.requires_grad
               for _, layer in lorakit.lora_layers(model))  # fmt: skip


def test_orthogonal_factors() -> None:
    """B A = 0 at init (A and B span orthogonal halves of Q), each of rank r / 2; seeded."""

    def factors(seed: int) -> list[Tensor]:
        model = MLP()
        torch.manual_seed(seed)
        lorakit.inject(model, _config("orthogonal", ("lin1", "lin2")))
        return [p.detach().clone() for n, p in model.named_parameters() if "lora_" in n]

    first = factors(1)
    for A, B in zip(first[0::2], first[1::2]):
        torch.testing.assert_close(B @ A, torch.zeros(B.shape[0], A.shape[1]), rtol=0, atol=1e-7)
        assert torch.linalg.matrix_rank(A) == 2 and torch.linalg.matrix_rank(B) == 2
        assert A.abs().min() > 0 and B.abs().min() > 0
    assert all(torch.equal(a, b) for a, b in zip(first, factors(1)))
    assert not torch.equal(first[0], factors(2)[0])


@pytest.mark.parametrize("init", MOVING)
def test_merge_unload_and_disable(init: str) -> None:
    """merge_and_unload gives the trained model on the original W; unload (and disabled)
    the residual base, as in PEFT."""
    x = features()
    model = MLP()
    lorakit.inject(model, _config(init, ("lin1", "lin2")))
    residual = {n: model.get_submodule(n).weight.detach().clone() for n in ("lin1", "lin2")}
    _train(model)
    with torch.no_grad():
        trained = model(x)
        merged = lorakit.merge_and_unload(copy.deepcopy(model))
        torch.testing.assert_close(merged(x), trained, rtol=0, atol=ATOL)
        with lorakit.disabled(model):
            off = model(x)
        unloaded = lorakit.unload(model)
        torch.testing.assert_close(unloaded(x), off, rtol=0, atol=0)
    for name, weight in residual.items():
        assert torch.equal(unloaded.get_submodule(name).weight, weight)


@pytest.mark.parametrize("init", MOVING)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_saved_adapter_replays_on_original_base(case: Case, init: str, tmp_path: Path) -> None:
    """The file names its init; loading onto the original base rewrites it to the residual
    again (a seeded fast SVD: the same seed), as PEFT's loader does."""
    x, model = case.x(), case.make()
    torch.manual_seed(3)
    lorakit.inject(model, _config(init, case.targets))
    _train(model)
    lorakit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    base = case.make()
    torch.manual_seed(3)
    loaded = lorakit.load_adapter(base, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            model_output(loaded, x), model_output(model, x), rtol=0, atol=ATOL
        )


@pytest.mark.parametrize("init", MOVING)
@pytest.mark.parametrize(
    "options",
    [{}, {"use_rslora": True}, {"use_dora": True},
     {"use_rslora": True, "rank_pattern": {"lin2": 2}, "alpha_pattern": {"lin1": 3}}],
    ids=["plain", "rslora", "dora", "rslora-patterns"],
)  # fmt: skip
def test_for_original_base(init: str, options: dict, tmp_path: Path) -> None:
    """The converted adapter (rank 2r, scale kept) on the ORIGINAL base = the trained adapter
    on the residual base; it is plain LoRA (init True) and mixes with other adapters."""
    x = features()
    model = MLP()
    lorakit.inject(model, _config(init, ("lin1", "lin2"), **options))
    _train(model)
    lorakit.save_adapter(model, tmp_path, for_original_base=True)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    assert saved["rank_pattern"] == {k: 2 * v for k, v in options.get("rank_pattern", {}).items()}
    factor = 2**0.5 if options.get("use_rslora") else 2
    assert saved["lora_alpha"] == pytest.approx(8 * factor)
    loaded = lorakit.load_adapter(MLP(), tmp_path)
    assert loaded.lin1.lora["default"].init == "zeros"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=ATOL)
        torch.testing.assert_close(loaded.lin1.weight, MLP().lin1.weight, rtol=0, atol=0)


def test_for_original_base_after_load(tmp_path: Path) -> None:
    """A PiSSA adapter loaded from its file converts too (the replay keeps A0 and B0)."""
    x = features()
    model = MLP()
    lorakit.inject(model, _config("pissa", ("lin1",)))
    _train(model)
    lorakit.save_adapter(model, tmp_path / "pissa")
    loaded = lorakit.load_adapter(MLP(), tmp_path / "pissa")
    lorakit.save_adapter(loaded, tmp_path / "lora", for_original_base=True)
    plain = lorakit.load_adapter(MLP(), tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=ATOL)


@pytest.mark.parametrize("init", ["kaiming", "mica", "orthogonal"])
def test_for_original_base_refuses_inits_that_kept_the_base(init: str, tmp_path: Path) -> None:
    model = MLP()
    lorakit.inject(model, _config(init, ("lin1",)))
    with pytest.raises(AdapterError, match=rf"init='{init}', which leaves the base weights"):
        lorakit.save_adapter(model, tmp_path, for_original_base=True)


def _attention() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"mha": nn.MultiheadAttention(8, 2)})


def _tied() -> nn.Module:
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize(
    ("make", "targets", "config", "error", "match"),
    [
        (MLP, ("conv",), {"init": "pissa"}, UnsupportedLayerError,
         r"module 'conv': init='pissa' supports Linear layers, not conv"),
        (MLP, ("conv",), {"init": "orthogonal"}, UnsupportedLayerError,
         r"init='orthogonal' supports Linear layers, not conv"),
        (MLP, ("conv",), {"init": "mica"}, UnsupportedLayerError,
         r"init='mica' supports Linear and Embedding layers, not conv"),
        (tiny_llama, ("embed_tokens",), {"init": "olora"}, UnsupportedLayerError,
         r"init='olora' supports Linear layers, not embedding"),
        (MLP, ("lin1",), {"init": "orthogonal", "rank": 3}, ConfigError,
         r"init='orthogonal' needs an even rank, got rank=3"),
        (MLP, ("lin1",), {"init": "mica", "use_dora": True}, ConfigError,
         r"init='mica' cannot be combined with use_dora"),
        (MLP, ("lin2",), {"init": "pissa", "rank": 11}, ConfigError,
         r"init='pissa' needs rank <= min\(in, out\) = 10, got rank=11"),
        (lambda: MLP().double(), ("lin1",), {"init": "olora"}, UnsupportedLayerError,
         r"init='olora' needs a float32, float16 or bfloat16 base weight, got Linear with "
         r"torch.float64"),
        (_attention, ("mha",), {"init": "pissa"}, UnsupportedLayerError,
         r"init='pissa' is not supported on nn.MultiheadAttention 'mha'.*no weight to read"),
        (_attention, ("mha",), {"init": "orthogonal"}, UnsupportedLayerError,
         r"init='orthogonal' is not supported on nn.MultiheadAttention 'mha'"),
        (_tied, ("lm_head",), {"init": "pissa"}, UnsupportedLayerError,
         r"rewrites the weight of 'lm_head', which is tied to \['model.embed_tokens'\]"),
    ],
)  # fmt: skip
def test_unsupported_combinations(make, targets, config, error, match) -> None:  # noqa: ANN001
    model = make()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(error, match=match):
        lorakit.inject(model, lorakit.LoraConfig(targets=targets, **{"rank": 4, **config}))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], t) for n, t in before.items())


def test_refused_target_leaves_every_weight_as_it_was() -> None:
    """All targets are checked before any base weight is rewritten."""
    model = MLP()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(UnsupportedLayerError, match=r"module 'conv'"):
        lorakit.inject(model, _config("pissa", ("lin1", "lin2", "conv")))
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


@pytest.mark.parametrize("merged", [False, True])
def test_base_moving_init_refused_beside_other_adapters(merged: bool) -> None:
    """The residual would change what the layer's other adapters (merged or not) add to."""
    model = MLP()
    lorakit.inject(model, _config("kaiming", ("lin1",)))
    if merged:
        lorakit.merge(model)
    weight = model.lin1.weight.detach().clone()
    with pytest.raises(AdapterError, match=r"module 'lin1': init='olora' rewrites the base "
                       r"weight, which adapters \['default'\] on this layer use too"):  # fmt: skip
        lorakit.inject(model, _config("olora", ("lin1",)), "second")
    assert torch.equal(model.lin1.weight, weight)
    lorakit.inject(model, _config("olora", ("lin2",)), "third")  # a bare layer is fine


@pytest.mark.parametrize("init", ["pissa_niter_", "pissa_niter_x", "PiSSA", "svd"])
def test_invalid_init_names(init: str) -> None:
    with pytest.raises(ConfigError, match=r"init must be one of .* or 'pissa_niter_K'"):
        lorakit.LoraConfig(init=init)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("init", ["pissa", "olora", "mica"])
def test_quantized_base_refuses_weight_inits(init: str, kind: str) -> None:
    """PEFT refuses PiSSA / MiCA on quantized weights too (OLoRA it re-quantizes, a lossy
    round trip lorakit leaves out); orthogonal needs no weight and works."""
    from qlora_models import quantized_mlp

    model = quantized_mlp(kind)
    match = (
        rf"init='{init}' needs a float32, float16 or bfloat16 base weight, "
        r"got Linear(4bit|8bitLt) with torch\.(uint8|int8)"
    )
    with pytest.raises(UnsupportedLayerError, match=match):
        lorakit.inject(model, _config(init, ("0",)))
    lorakit.inject(model, _config("orthogonal", ("0",)))
    assert model[0].lora["default"].lora_A.abs().sum() > 0


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_16", "olora", "mica", "orthogonal"])
def test_finetune_flag_takes_the_inits(init: str) -> None:
    """`lorakit finetune --init` takes the `Init` names and pissa_niter_K."""
    from lorakit.cli import build_parser
    from lorakit.cli.finetune import options_from_args

    _, lora = options_from_args(build_parser().parse_args(["finetune", "--init", init]))
    assert lora.init == init


def test_mica_file_loads_with_b_frozen(tmp_path: Path) -> None:
    x = features()
    model = MLP()
    lorakit.inject(model, _config("mica", ("lin1", "lin2")))
    _train(model)
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.load_adapter(MLP(), tmp_path)
    assert not loaded.lin1.lora["default"].lora_B.requires_grad
    assert loaded.lin1.lora["default"].lora_A.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=ATOL)


def test_finetune_flag_refuses_other_inits(capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--init", "pissa_niter_x"])
    assert "invalid choice: 'pissa_niter_x'" in capsys.readouterr().err


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "mica", "orthogonal"])
def test_lora_bias_needs_the_default_init(init: str) -> None:
    """PEFT: "lora_bias=True is only supported with init_lora_weights=True or False"."""
    with pytest.raises(ConfigError, match=rf"lora_bias=True is not supported with init='{init}'"):
        lorakit.LoraConfig(init=init, lora_bias=True)  # type: ignore[arg-type]
