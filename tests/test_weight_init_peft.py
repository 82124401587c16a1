"""PiSSA, OLoRA, MiCA and orthogonal against the real `peft` package: the same factors and
residual base, PEFT's files (as saved, and converted for the original base) load in lorakit
with the same outputs, and lorakit's in PEFT. PEFT's other LoRA variants are refused by name."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft_cross import MLP, features, model_output, tokens
from test_checkpoint import _edit_config
from test_dora_peft import _our_name
from torch import Tensor, nn

import lorakit
from lorakit import CheckpointError

ATOL = 1e-5


@dataclass(frozen=True)
class Case:
    id: str
    init: str
    make: Callable[[], nn.Module]
    targets: tuple[str, ...]
    x: Callable[[], Tensor]
    extra: dict = field(default_factory=dict)  # PEFT-only options
    both: dict = field(default_factory=dict)  # options both libraries name alike


GPT2 = {"fan_in_fan_out": True}
CASES = [
    Case("linear-pissa", "pissa", MLP, ("lin1", "lin2"), features),
    Case("linear-olora", "olora", MLP, ("lin1", "lin2"), features),
    Case("linear-mica", "mica", MLP, ("lin1", "lin2"), features),
    Case("linear-pissa-dora", "pissa", MLP, ("lin1", "lin2"), features, both={"use_dora": True}),
    Case("linear-olora-rslora", "olora", MLP, ("lin1",), features, both={"use_rslora": True}),
    Case("gpt2-pissa", "pissa", tiny_gpt2, ("c_attn", "c_proj", "c_fc"), tokens, GPT2),
    Case("gpt2-mica", "mica", tiny_gpt2, ("c_attn", "c_proj"), tokens, GPT2),
    Case("llama-pissa", "pissa", tiny_llama, ("q_proj", "down_proj"), tokens),
    Case("llama-olora", "olora", tiny_llama, ("q_proj", "down_proj"), tokens),
    Case("llama-embedding-mica", "mica", tiny_llama, ("embed_tokens", "q_proj"), tokens),
]
MOVING = [c for c in CASES if c.init != "mica"]


def _peft_config(case: Case, init: object = None) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(case.targets),
        init_lora_weights=case.init if init is None else init, **case.extra, **case.both,
    )  # fmt: skip


def _config(case: Case) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(rank=4, alpha=8, targets=case.targets, init=case.init, **case.both)  # type: ignore[arg-type]


def _train(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def _weights(model: nn.Module) -> dict[str, Tensor]:
    """Base weights and LoRA factors under lorakit's names."""
    return {_our_name(n): p.detach() for n, p in model.named_parameters() if "bias" not in n}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_same_factors_and_residual_as_peft(case: Case) -> None:
    """A, B and the rewritten base weights equal PEFT's; MiCA's B is frozen in both."""
    ref = peft.get_peft_model(case.make(), _peft_config(case))
    model = case.make()
    lorakit.inject(model, _config(case))
    ours, theirs = _weights(model), _weights(ref)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6, msg=name)
    frozen = {_our_name(n) for n, p in ref.named_parameters() if not p.requires_grad}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen


@pytest.mark.parametrize("init", ["pissa_niter_3", "orthogonal"])
def test_seeded_inits_draw_as_peft(init: str) -> None:
    """The random inits make PEFT's draws from the global generator (also those of the
    nn.Linear PEFT builds first), so a seeded model gets PEFT's factors and residual."""
    case = Case(init, init, MLP, ("lin1", "lin2"), features)
    base = case.make()
    torch.manual_seed(11)
    ref = peft.get_peft_model(base, _peft_config(case))
    model = case.make()
    torch.manual_seed(11)
    lorakit.inject(model, _config(case))
    ours, theirs = _weights(model), _weights(ref)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6, msg=name)


def test_seeded_fast_svd_file_loads_as_in_peft(tmp_path: Path) -> None:
    """A PEFT "pissa_niter_K" file: each loader replays a fresh random SVD; under one seed
    lorakit's equals PEFT's own reload."""
    case = Case("niter", "pissa_niter_2", MLP, ("lin1", "lin2"), features)
    ref = peft.get_peft_model(case.make(), _peft_config(case))
    _train(ref, seed=5)
    ref.save_pretrained(tmp_path)
    x, base, other = case.x(), case.make(), case.make()
    torch.manual_seed(12)
    again = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    torch.manual_seed(12)
    model = lorakit.load_adapter(other, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model_output(model, x), model_output(again, x), rtol=0, atol=ATOL
        )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peft_file_loads_on_original_base(case: Case, tmp_path: Path) -> None:
    """PEFT's save (init_lora_weights still "pissa", ...) onto the original base: both
    libraries replay the init, so outputs and merges agree."""
    ref = peft.get_peft_model(case.make(), _peft_config(case))
    _train(ref, seed=5)
    ref.eval().save_pretrained(tmp_path)
    x = case.x()
    model = lorakit.load_adapter(case.make(), tmp_path).eval()
    again = peft.PeftModel.from_pretrained(case.make(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, x), model_output(ref, x), rtol=0, atol=ATOL)
        torch.testing.assert_close(model_output(again, x), model_output(ref, x), rtol=0, atol=ATOL)
        merged = lorakit.merge_and_unload(copy.deepcopy(model))
        merged_ref = copy.deepcopy(ref).merge_and_unload()
        torch.testing.assert_close(
            model_output(merged, x), model_output(merged_ref, x), rtol=0, atol=ATOL
        )


@pytest.mark.parametrize("case", MOVING, ids=[c.id for c in MOVING])
def test_peft_converted_file_loads_on_original_base(case: Case, tmp_path: Path) -> None:
    """PEFT's `path_initial_model_for_weight_conversion`: plain LoRA of rank 2r that lorakit
    loads onto the original base with the trained model's outputs."""
    ref = peft.get_peft_model(case.make(), _peft_config(case))
    ref.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial save
    ref.save_pretrained(tmp_path / "initial")
    ref.peft_config["default"].init_lora_weights = case.init
    _train(ref, seed=5)
    ref.eval().save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    saved = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    x = case.x()
    if case.both.get("use_dora"):  # PEFT's conversion drops the magnitude: refused, by key
        with pytest.raises(CheckpointError, match=r"missing '.*lin1.lora_magnitude_vector'"):
            lorakit.load_adapter(case.make(), tmp_path / "converted")
        return
    model = lorakit.load_adapter(case.make(), tmp_path / "converted").eval()
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, x), model_output(ref, x), rtol=0, atol=ATOL)


@pytest.mark.parametrize("convert", [False, True], ids=["as-trained", "for-original-base"])
@pytest.mark.parametrize("case", MOVING, ids=[c.id for c in MOVING])
def test_lorakit_file_loads_in_peft(case: Case, convert: bool, tmp_path: Path) -> None:
    """lorakit's save, as trained (PEFT replays the init) or converted, in PEFT on the
    original base."""
    model = case.make()
    lorakit.inject(model, _config(case))
    _train(model, seed=6)
    lorakit.save_adapter(model, tmp_path, for_original_base=convert)
    x = case.x()
    ref = peft.PeftModel.from_pretrained(case.make(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model_output(ref, x), model_output(model.eval(), x), rtol=0, atol=ATOL
        )


# PEFT's other LoRA variants (peft/tuners/lora/variants.py), with a value as its files hold
# them: each refused at load, by the option's name (docs/peft-parity.md: "PEFT's LoRA variants").
REFUSED_VARIANTS = {
    "velora_config": {"rank": 4, "num_groups": 2},
    "use_bdlora": {"nblocks": 2, "target_modules_bd_a": ["lin1"]},
    "kasa_config": {"beta": 1e-4},
    "monteclora_config": {"num_samples": 4},
    "arrow_config": {"top_k": 2},
    "alora_invocation_tokens": [1, 2],
    "use_qalora": True,
}


@pytest.mark.parametrize("key", REFUSED_VARIANTS)
def test_other_variants_are_refused_by_name(key: str, tmp_path: Path) -> None:
    model = MLP()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=("lin1",)))
    lorakit.save_adapter(model, tmp_path)
    _edit_config(tmp_path, **{key: REFUSED_VARIANTS[key]})
    with pytest.raises(CheckpointError, match=rf"{key}=.* is a PEFT feature lorakit does not"):
        lorakit.load_adapter(MLP(), tmp_path)


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_data_driven_base_rewriting_inits_are_refused(init: str, tmp_path: Path) -> None:
    model = MLP()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=("lin1",)))
    lorakit.save_adapter(model, tmp_path)
    _edit_config(tmp_path, init_lora_weights=init)
    with pytest.raises(CheckpointError, match=rf"init_lora_weights='{init}' rewrites the base"):
        lorakit.load_adapter(MLP(), tmp_path)
