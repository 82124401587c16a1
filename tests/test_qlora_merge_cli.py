"""`lorakit merge --quantized-base`: an adapter trained on a quantized base, merged into a plain
full-precision folder that gives the quantized base + adapter's logits."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import qlora_models
import torch
from conftest import randomise_lora
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.train.model import load_model
from lorakit.train.quantize import prepare_quantized, quantization_config

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
LORA = lorakit.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
# kind -> logits tolerance: nf4 / fp4 dequantize exactly what the quantized forward computes
# with; int8's forward also rounds its inputs to 8 bits, so the merged float model differs more.
KINDS = {"nf4": 1e-4, "fp4": 1e-4, "int8": 0.1}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qlora_models.llama_folder(tmp_path_factory.mktemp("models") / "llama")


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def trained_run(llama_dir: Path, run: Path, kind: str) -> torch.Tensor:
    """An adapter "trained" on `kind`'s quantized base in `run` (adapter/ and a finetune-style
    run.json recording --quantize); returns the quantized base + adapter's logits."""
    model = load_model(llama_dir, "causal-lm", quantization_config=quantization_config(kind, False))
    prepare_quantized(model)  # the training layout (no CPU inference repacking), as finetune
    lorakit.inject(model, LORA)
    randomise_lora(model, std=0.05)
    lorakit.save_adapter(model, run / "adapter", base_model=str(llama_dir))
    (run / "run.json").write_text(json.dumps({"task": "causal-lm", "options": {"quantize": kind}}))
    return logits(model.eval())


@pytest.mark.parametrize("kind", KINDS)
def test_merged_folder_gives_the_quantized_base_plus_adapter(kind, llama_dir, tmp_path, capsys):
    want = trained_run(llama_dir, tmp_path / "run", kind)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(tmp_path / "run" / "adapter"), "--out", str(out)]) == 0
    assert f"(loaded as {kind}, dequantized)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert not any("absmax" in k or "SCB" in k or "lora" in k for k in f.keys())
    assert dtypes == {"F32"}
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("bitsandbytes" in type(m).__module__ for m in merged.modules())
    torch.testing.assert_close(logits(merged), want, rtol=KINDS[kind], atol=KINDS[kind])


def test_flag_overrides_the_run_file_and_none_merges_into_the_float_base(llama_dir, tmp_path):
    want = trained_run(llama_dir, tmp_path / "run", "nf4")
    adapter = str(tmp_path / "run" / "adapter")
    merged = {}
    for flag in ("nf4", "none"):
        out = tmp_path / flag
        argv = ["merge", "--adapter", adapter, "--out", str(out), "--quantized-base", flag]
        assert main(argv) == 0
        merged[flag] = logits(AutoModelForCausalLM.from_pretrained(out))
    torch.testing.assert_close(merged["nf4"], want, rtol=1e-4, atol=1e-4)
    # W + s B A is not what was trained: the adapter corrected the NF4 base, not the float one
    assert (merged["none"] - want).abs().max() > 100 * (merged["nf4"] - want).abs().max()


ERRORS = {
    "bad run.json": ({"options": {"quantize": "q3"}}, (), "options.quantize 'q3' is not one of"),
    "bad flag": ({}, ("--quantized-base", "q3"), "argument --quantized-base: invalid choice"),
}


@pytest.mark.parametrize(("run", "flags", "message"), ERRORS.values(), ids=ERRORS)
def test_errors_name_the_fault(run, flags, message, llama_dir, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    lorakit.inject(model, LORA)
    lorakit.save_adapter(model, tmp_path / "run" / "adapter", base_model=str(llama_dir))
    (tmp_path / "run" / "run.json").write_text(json.dumps(run))
    argv = ["merge", "--adapter", str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) if flags else contextlib.nullcontext():  # argparse exits
        assert main([*argv, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
