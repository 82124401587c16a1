"""LoRA on nn.MultiheadAttention against the real `peft` package: files both ways, outputs,
merges and gradients; what both refuse."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
from peft_quirks import PEFT_OUT_PROJ_FACTOR, fix_peft_out_proj
from safetensors.torch import load_file
from torch import Tensor, nn

import lorakit
from lorakit.errors import ConfigError, UnsupportedLayerError
from lorakit.layers import LoraLayer

ATOL = 1e-5
WEIGHTS = "adapter_model.safetensors"
EMBED, HEADS, BATCH, SEQ = 8, 2, 2, 5


class AttentionNet(nn.Module):
    """Self-attention then a Linear; returns the output and, with need_weights, the weights."""

    def __init__(self, **mha: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(EMBED, HEADS, **mha)
        self.lin0 = nn.Linear(EMBED, 4)

    def forward(self, x: Tensor, **call: object) -> Tensor:
        y, weights = self.mha(x, x, x, **call)
        out = self.lin0(y).flatten()
        return out if weights is None else torch.cat([out, weights.flatten()])


def _causal() -> Tensor:
    return torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)


def _float_mask() -> Tensor:
    return torch.randn(SEQ, SEQ, generator=torch.Generator().manual_seed(3))


def _padding() -> Tensor:
    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    mask[1, -2:] = True
    return mask


@dataclass(frozen=True)
class Case:
    id: str
    mha: dict = field(default_factory=dict)  # nn.MultiheadAttention options
    call: dict = field(default_factory=dict)  # forward options (masks: builders)
    targets: tuple[str, ...] = ("mha",)
    rank: int = 4
    both: dict = field(default_factory=dict)  # config options both libraries name alike

    def make(self) -> AttentionNet:
        return AttentionNet(**self.mha)

    def x(self) -> Tensor:
        shape = (BATCH, SEQ, EMBED) if self.mha.get("batch_first") else (SEQ, BATCH, EMBED)
        return torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def kwargs(self) -> dict:
        return {k: v() if callable(v) else v for k, v in self.call.items()}


NO_WEIGHTS = {"need_weights": False}
CASES = [
    Case("seq-first", call=NO_WEIGHTS),
    Case("batch-first", mha={"batch_first": True}, call=NO_WEIGHTS),
    Case("no-bias", mha={"bias": False, "batch_first": True}, call=NO_WEIGHTS),
    Case("need-weights", mha={"batch_first": True}, call={"need_weights": True}),
    Case("per-head-weights", call={"need_weights": True, "average_attn_weights": False}),
    Case("causal-mask", mha={"batch_first": True}, call={"attn_mask": _causal, **NO_WEIGHTS}),
    Case("float-mask", call={"attn_mask": _float_mask, "need_weights": True}),
    Case("padding-mask", mha={"batch_first": True},
         call={"key_padding_mask": _padding, **NO_WEIGHTS}),
    Case("bias-kv-zero-attn", mha={"add_bias_kv": True, "add_zero_attn": True}, call=NO_WEIGHTS),
    Case("with-linear", targets=("mha", "lin0"), call=NO_WEIGHTS, rank=2),
    Case("rslora-rank-pattern", targets=("mha", "lin0"), call=NO_WEIGHTS,
         both={"use_rslora": True, "rank_pattern": {"mha": 3}, "alpha_pattern": {"mha": 5}}),
]  # fmt: skip


def _nudge_trainable(model: nn.Module, seed: int) -> None:
    """Every trainable tensor random, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def _peft_config(case: Case, **more: object) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=case.rank, lora_alpha=2 * case.rank, target_modules=list(case.targets), **case.both,
        **more,
    )  # fmt: skip


def _peft_model(case: Case) -> nn.Module:
    model = peft.get_peft_model(case.make(), _peft_config(case))
    _nudge_trainable(model, seed=5)
    return model


def _lorakit_config(case: Case) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(rank=case.rank, alpha=2 * case.rank, targets=case.targets,
                              **case.both)  # fmt: skip


def _run(model: nn.Module, case: Case) -> Tensor:
    return model(case.x(), **case.kwargs())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peft_file_loads_in_lorakit(case: Case, tmp_path: Path) -> None:
    ref = _peft_model(case).eval()
    ref.save_pretrained(tmp_path)
    fix_peft_out_proj(ref)
    model = lorakit.from_pretrained(case.make(), tmp_path).eval()
    assert isinstance(model.mha, LoraLayer) and isinstance(model.mha.out_proj, LoraLayer)
    with torch.no_grad():
        want = _run(ref, case)
        assert not torch.allclose(_run(case.make(), case), want, atol=1e-3)
        torch.testing.assert_close(_run(model, case), want, rtol=0, atol=ATOL)
        merged_ref = copy.deepcopy(ref).merge_and_unload()
        merged = lorakit.merge_and_unload(copy.deepcopy(model))
        assert type(merged.mha) is nn.MultiheadAttention
        torch.testing.assert_close(_run(merged, case), _run(merged_ref, case), rtol=0, atol=ATOL)
        theirs = merged_ref.state_dict()
        assert merged.state_dict().keys() == theirs.keys()
        for name, tensor in merged.state_dict().items():
            torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lorakit_file_loads_in_peft(case: Case, tmp_path: Path) -> None:
    model = case.make()
    lorakit.inject(model, _lorakit_config(case))
    _nudge_trainable(model, seed=6)
    lorakit.save_adapter(model, tmp_path / "ours")
    peft.get_peft_model(case.make(), _peft_config(case)).save_pretrained(tmp_path / "theirs")
    ours, theirs = (load_file(tmp_path / d / WEIGHTS) for d in ("ours", "theirs"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_modules"] == list(case.targets)
    ref = fix_peft_out_proj(peft.PeftModel.from_pretrained(case.make(), tmp_path / "ours"))
    ref.eval()
    model.eval()
    with torch.no_grad():
        want = _run(model, case)
        assert not torch.allclose(_run(case.make(), case), want, atol=1e-3)
        torch.testing.assert_close(_run(ref, case), want, rtol=0, atol=ATOL)


def test_saved_keys_name_out_proj_under_the_wrapper(tmp_path: Path) -> None:
    model = AttentionNet()
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("mha",)))
    lorakit.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS))
    prefix = "base_model.model.mha."
    assert keys == {prefix + k for k in ("lora_A.weight", "lora_B.weight",
                                         "base_layer.out_proj.lora_A.weight",
                                         "base_layer.out_proj.lora_B.weight")}  # fmt: skip


def _our_name(peft_name: str) -> str:
    """`base_model.model.mha.base_layer.out_proj.lora_A.default.weight` ->
    `mha.out_proj.lora.default.lora_A`."""
    name = peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return re.sub(r"\.lora_([AB])\.(\w+)\.weight$", r".lora.\2.lora_\1", name)


def _grads(model: nn.Module, case: Case, rename) -> dict[str, Tensor]:
    out = _run(model, case)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    named = [(rename(n), p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [p for _, p in named], g)
    return {n: grad for (n, _), grad in zip(named, grads)}


GRAD_CASES = [c for c in CASES if c.id in ("seq-first", "need-weights", "with-linear")]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.id for c in GRAD_CASES])
def test_gradients_match_peft(case: Case, tmp_path: Path) -> None:
    ref = _peft_model(case)
    ref.save_pretrained(tmp_path)
    fix_peft_out_proj(ref)
    model = lorakit.from_pretrained(case.make(), tmp_path)
    ref.train()
    model.train()
    want = _grads(ref, case, _our_name)
    # PEFT's second out_proj delta goes through `.data`, outside autograd: with B / factor its
    # graph holds s (B / factor) A, so its gradient of out_proj's A is ours / factor
    name = "mha.out_proj.lora.default.lora_A"
    want[name] = want[name] * PEFT_OUT_PROJ_FACTOR
    got = _grads(model, case, lambda n: n)
    assert got.keys() == want.keys()
    assert {"mha.lora.default.lora_A", "mha.out_proj.lora.default.lora_B"} <= got.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=ATOL, msg=name)


def test_merge_and_unmerge_are_exact_and_match_peft(tmp_path: Path) -> None:
    case = CASES[1]
    ref = _peft_model(case).eval()
    ref.save_pretrained(tmp_path)
    fix_peft_out_proj(ref)
    model = lorakit.from_pretrained(case.make(), tmp_path).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = _run(model, case)
        lorakit.merge(model)
        ref.merge_adapter()
        base = ref.base_model.model.mha.base_layer
        torch.testing.assert_close(model.mha.in_proj_weight, base.in_proj_weight, rtol=0, atol=ATOL)
        torch.testing.assert_close(model.mha.out_proj.weight, base.out_proj.base_layer.weight,
                                   rtol=0, atol=ATOL)  # fmt: skip
        torch.testing.assert_close(_run(model, case), unmerged, rtol=0, atol=1e-6)
        lorakit.unmerge(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_two_active_adapters_match_peft(tmp_path: Path) -> None:
    case = CASES[0]
    ref = _peft_model(case)
    ref.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["mha"]))
    ref.set_adapter("second")
    _nudge_trainable(ref, seed=9)
    ref.save_pretrained(tmp_path)
    fix_peft_out_proj(ref)
    ref.base_model.set_adapter(["default", "second"])
    ref.eval()
    model = case.make()
    lorakit.load_adapter(model, tmp_path)
    lorakit.load_adapter(model, tmp_path, adapter_name="second")
    lorakit.set_active(model, ["default", "second"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_run(model, case), _run(ref, case), rtol=0, atol=ATOL)
        lorakit.set_active(model, "second")
        ref.base_model.set_adapter("second")
        torch.testing.assert_close(_run(model, case), _run(ref, case), rtol=0, atol=ATOL)


def test_disable_delete_and_unload_give_the_base_back() -> None:
    case = CASES[0]
    model = case.make()
    names = set(model.state_dict())
    lorakit.inject(model, _lorakit_config(case))
    _nudge_trainable(model, seed=1)
    assert {n for n in model.state_dict() if ".lora." not in n} == names
    with torch.no_grad():
        base = _run(case.make(), case)
        with lorakit.disabled(model):
            torch.testing.assert_close(_run(model, case), base, rtol=0, atol=0)
        lorakit.delete_adapter(model, "default")
        assert type(model.mha) is nn.MultiheadAttention
        assert not isinstance(model.mha.out_proj, LoraLayer)
        torch.testing.assert_close(_run(model, case), base, rtol=0, atol=0)
        lorakit.inject(model, _lorakit_config(case))
        lorakit.unload(model)
        assert type(model.mha) is nn.MultiheadAttention and set(model.state_dict()) == names


def test_peft_adds_out_proj_delta_twice_lorakit_once() -> None:
    """The one difference from PEFT 0.21 (see `peft_quirks`); the tests above compare
    with PEFT's out_proj B divided by this factor, so they hold before and after PEFT's fix."""
    assert PEFT_OUT_PROJ_FACTOR in (1, 2)
    model = AttentionNet()
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("mha",)))
    _nudge_trainable(model, seed=3)
    out_proj = model.mha.out_proj
    want = out_proj.weight + out_proj.delta_weight("default")
    lorakit.merge(model)
    torch.testing.assert_close(out_proj.weight, want, rtol=0, atol=0)


# -- what is refused, and what PEFT refuses alike ------------------------------------------
def test_out_proj_alone_is_refused_with_the_way_out() -> None:
    model = AttentionNet()
    with pytest.raises(UnsupportedLayerError, match=r"'mha\.out_proj'.*silently ignored.*'mha'"):
        lorakit.inject(model, lorakit.LoraConfig(targets=("out_proj",)))
    assert not isinstance(model.mha.out_proj, LoraLayer)


def test_out_proj_named_with_its_attention_is_adapted_once() -> None:
    model = AttentionNet()
    report = lorakit.inject(model, lorakit.LoraConfig(targets=("mha", "out_proj")))
    assert report.adapted == ("mha", "mha.out_proj")


@pytest.mark.parametrize(
    ("mha", "config", "error", "match"),
    [
        ({"kdim": 4, "vdim": 4}, {}, UnsupportedLayerError, r"kdim=4, vdim=4.*packed"),
        ({}, {"use_dora": True}, UnsupportedLayerError, r"use_dora=True.*MultiheadAttention"),
        ({}, {"bias": "all"}, ConfigError, r"bias='all'.*'mha'.*bias='none'"),
        ({}, {"bias": "lora_only"}, ConfigError, r"bias='lora_only'.*MultiheadAttention"),
    ],
    ids=["kdim-vdim", "dora", "bias-all", "bias-lora-only"],
)
def test_refused_options(mha: dict, config: dict, error: type, match: str) -> None:
    model = AttentionNet(**mha)
    with pytest.raises(error, match=match):
        lorakit.inject(model, lorakit.LoraConfig(targets=("mha",), **config))
    assert type(model.mha) is nn.MultiheadAttention
    assert not isinstance(model.mha.out_proj, LoraLayer)


@pytest.mark.parametrize(
    ("mha", "config"), [({"kdim": 4, "vdim": 4}, {}), ({}, {"use_dora": True})],
    ids=["kdim-vdim", "dora"],
)  # fmt: skip
def test_peft_refuses_them_too(mha: dict, config: dict) -> None:
    with pytest.raises(ValueError):
        peft.get_peft_model(AttentionNet(**mha), peft.LoraConfig(target_modules=["mha"], **config))


def test_mixed_batches_are_refused() -> None:
    model = AttentionNet()
    lorakit.inject(model, lorakit.LoraConfig(targets=("mha",)))
    with pytest.raises(UnsupportedLayerError, match=r"mixed-adapter.*'mha'.*MultiheadAttention"):
        with lorakit.routing(model, ["default", None]):
            pass


def test_dropout_is_not_applied_and_says_so() -> None:
    model = AttentionNet()
    with pytest.warns(UserWarning, match=r"dropout=0.1 is not applied on nn.MultiheadAttention"):
        lorakit.inject(model, lorakit.LoraConfig(targets=("mha",), dropout=0.1))


def test_peft_adapter_on_out_proj_alone_changes_nothing() -> None:
    """Why lorakit refuses it: PEFT accepts it, and the adapter is silently ignored."""
    config = peft.LoraConfig(target_modules=["out_proj"], init_lora_weights=False)
    ref = peft.get_peft_model(AttentionNet(), config).eval()
    case = CASES[0]
    with torch.no_grad():
        torch.testing.assert_close(_run(ref, case), _run(case.make(), case), rtol=0, atol=0)


def test_routing_rows_of_adapters_elsewhere_leaves_attention_at_base() -> None:
    """A routed adapter that is not on the MHA: the MHA computes its base output, as each row
    would alone with only that adapter active."""
    case = CASES[1]  # batch first: routing takes the batch on dim 0
    model = case.make()
    lorakit.inject(model, lorakit.LoraConfig(targets=("mha",)), adapter_name="a")
    lorakit.inject(model, lorakit.LoraConfig(targets=("lin0",)), adapter_name="b")
    lorakit.set_active(model, ["a", "b"])
    _nudge_trainable(model, seed=4)
    model.eval()
    with torch.no_grad():
        with lorakit.routing(model, ["b"] * BATCH):
            routed = _run(model, case)
        lorakit.set_active(model, "b")
        torch.testing.assert_close(routed, _run(model, case), rtol=0, atol=1e-6)
