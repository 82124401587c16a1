"""`lorakit finetune --quantize` (QLoRA) and `--optim`: flags, errors, a few real steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import qlora_models
import torch
from tiny_hf import completion_records, sentiment_records, write_jsonl
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.errors import ConfigError, MissingDependencyError
from lorakit.train import TrainOptions
from lorakit.train.model import load_model
from lorakit.train.quantize import (
    make_optimizer,
    norms_to_float32,
    prepare_quantized,
    quantization_config,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qlora_models.llama_folder(tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qlora_models.bert_folder(tmp_path_factory.mktemp("models") / "bert")


def finetune(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    common = ("--threads", "1", "--progress", "none", "--max-steps", "3", "--eval-every", "0")
    code = main(["finetune", *argv, *common])
    return code, capsys.readouterr().err


RUNS = {
    "nf4": ("--quantize", "nf4"),
    "fp4-bf16-checkpointing": (
        "--quantize", "fp4", "--precision", "bf16", "--gradient-checkpointing",
    ),
    "int8-adamw8bit": ("--quantize", "int8", "--optim", "adamw8bit"),
    "nf4-paged": ("--quantize", "nf4", "--optim", "paged_adamw", "--gradient-checkpointing"),
}  # fmt: skip


@pytest.mark.parametrize("flags", RUNS.values(), ids=RUNS)
def test_finetune_quantized_causal_lm_saves_an_adapter(flags, llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", completion_records(24))
    out = tmp_path / "out"
    code, err = finetune(capsys, "--model", str(llama_dir), "--data", str(data), "--out", str(out),
                         "--batch-size", "4", *flags)  # fmt: skip
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["quantize"] == flags[1]
    model = AutoModelForCausalLM.from_pretrained(llama_dir)  # the full-precision base
    lorakit.load_adapter(model, out / "adapter")
    b = model.model.layers[0].self_attn.q_proj.lora["default"].lora_B
    assert b.abs().sum() > 0  # trained: B starts at zero


def test_finetune_quantized_classifier_trains_the_head_in_float32(bert_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(24))
    out = tmp_path / "out"
    code, err = finetune(capsys, "--model", str(bert_dir), "--data", str(data), "--out", str(out),
                         "--quantize", "nf4", "--precision", "bf16")  # fmt: skip
    assert code == 0, err
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]


@pytest.mark.parametrize("bf16", [False, True])
def test_quantized_load_keeps_heads_unquantized_and_norms_float32(bf16, llama_dir):
    import bitsandbytes as bnb

    config = quantization_config("nf4", bf16)
    dtype = torch.bfloat16 if bf16 else None
    model = load_model(llama_dir, "causal-lm", dtype=dtype, quantization_config=config)
    prepare_quantized(model)
    norms = norms_to_float32(model)  # already float32: prepare_quantized did it
    assert "model.norm" in norms
    assert all(model.get_submodule(p).weight.dtype == torch.float32 for p in norms)
    assert type(model.lm_head) is torch.nn.Linear
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.compute_dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert q_proj.weight.quant_state.nested  # double quantization, as QLoRA
    assert not q_proj.support_avx512bf16_for_cpu  # no CPU repacking: it has no backward


def test_quantization_configs():
    assert quantization_config("none", False) is None
    nf4 = quantization_config("nf4", False, keep=("head",))
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert {"lm_head", "classifier", "score", "head"} <= set(nf4.llm_int8_skip_modules)
    assert quantization_config("fp4", True).bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("int8", False).load_in_8bit


@pytest.mark.parametrize(
    ("optim", "name"),
    [("adamw", "AdamW"), ("adamw8bit", "AdamW8bit"), ("paged_adamw", "PagedAdamW")],
)
def test_make_optimizer(optim, name):
    params = [torch.nn.Parameter(torch.zeros(4))]
    optimizer = make_optimizer([{"params": params, "weight_decay": 0.0}], optim, lr=1e-3)
    assert type(optimizer).__name__ == name


def test_flags_appear_with_their_choices(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--quantize {none,nf4,fp4,int8}" in help_text
    assert "--optim {adamw,adamw8bit,paged_adamw}" in help_text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantize": "q4"}, "quantize must be one of"),
        ({"optim": "sgd"}, "optim must be one of"),
        ({"quantize": "nf4", "fsdp": True}, "with fsdp is not supported"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainOptions(**options)


MISSING = [({"quantize": "nf4"}, "quantize='nf4'"), ({"optim": "adamw8bit"}, "optim='adamw8bit'")]


@pytest.mark.parametrize(("options", "flag"), MISSING)
def test_missing_bitsandbytes_names_the_install(options, flag, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, find_spec refuses
    with pytest.raises(
        MissingDependencyError, match=rf"{flag} needs bitsandbytes.*pip install bitsandbytes"
    ):
        TrainOptions(**options)
    TrainOptions()  # the defaults need no bitsandbytes


def test_missing_bitsandbytes_at_the_command_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    code, err = finetune(capsys, "--quantize", "nf4", "--out", str(tmp_path / "o"))
    assert code != 0
    assert "pip install bitsandbytes" in err
