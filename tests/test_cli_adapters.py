"""`lorakit inspect` and `lorakit merge` on real files: tiny transformers models in tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from conftest import randomise_lora, tiny_bert, tiny_gpt2, tiny_llama
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BertForSequenceClassification, GPT2LMHeadModel

import lorakit
from lorakit.cli import main

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def llama_files(tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    """(base folder, adapter folder, adapted logits) for a tiny Llama."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    config = lorakit.LoraConfig(
        rank=4, alpha=8, targets=("q_proj", "v_proj", "embed_tokens"), rank_pattern={"v_proj": 2}
    )
    lorakit.inject(base, config)
    randomise_lora(base)
    lorakit.save_adapter(base, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", _logits(base)


def test_merge_writes_a_plain_transformers_folder(llama_files, tmp_path: Path, capsys) -> None:
    base, adapter, want = llama_files
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    assert "into 5 layers" in capsys.readouterr().out
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k for k in keys)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(merged), want, rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(tiny_llama()), want, atol=1e-3)


@pytest.mark.parametrize("which", ["gpt2", "bert"])
def test_merge_gpt2_conv1d_and_bert_modules_to_save(which: str, tmp_path: Path) -> None:
    make, cls, config = {
        "gpt2": (tiny_gpt2, GPT2LMHeadModel, lorakit.LoraConfig(targets=("c_attn", "c_fc"))),
        "bert": (
            tiny_bert,
            BertForSequenceClassification,
            lorakit.LoraConfig(targets=("query",), modules_to_save=("classifier",), bias="all"),
        ),
    }[which]
    model = make()
    model.save_pretrained(tmp_path / "base")
    lorakit.inject(model, config)
    randomise_lora(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0) if which == "bert" else None
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.add_(0.5)
    lorakit.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    args = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    assert main([*args, "--out", str(out)]) == 0
    torch.testing.assert_close(_logits(cls.from_pretrained(out).eval()), _logits(model),
                               rtol=0, atol=1e-5)  # fmt: skip


def test_merge_through_a_real_subprocess(llama_files, tmp_path: Path) -> None:
    base, adapter, want = llama_files
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "lorakit", "merge", "--base", str(base), "--adapter",
           str(adapter), "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(merged), want, rtol=0, atol=1e-5)


def test_merge_errors_name_the_fault(llama_files, tmp_path: Path, capsys) -> None:
    base, adapter, _ = llama_files
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    cases = [
        (["--base", str(tmp_path / "nope"), "--adapter", str(adapter)], "nope does not exist"),
        (["--base", str(adapter), "--adapter", str(adapter)], "holds no config.json"),
        (["--base", str(base), "--adapter", str(tmp_path / "none")], "none does not exist"),
    ]
    for args, message in cases:
        assert main(["merge", *args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "lorakit merge: error:" in err and message in err, err
        assert not (tmp_path / "o").exists()
    full = ["merge", "--base", str(base), "--adapter", str(adapter), "--out"]
    assert main([*full, str(tmp_path / "full")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    other = tiny_gpt2()  # an adapter for another base
    lorakit.inject(other, lorakit.LoraConfig(targets=("c_attn",)))
    lorakit.save_adapter(other, tmp_path / "gpt2-adapter")
    wrong = ["merge", "--base", str(base), "--adapter", str(tmp_path / "gpt2-adapter")]
    assert main([*wrong, "--out", str(tmp_path / "o")]) == 2
    assert "saved for another base model" in capsys.readouterr().err
    assert not list(tmp_path.glob(".o.*")) and not (tmp_path / "o").exists()


def test_inspect_text_and_json(llama_files, capsys) -> None:
    _, adapter, _ = llama_files
    assert main(["inspect", str(adapter)]) == 0
    text = capsys.readouterr().out
    meta = safe_open(adapter / "adapter_model.safetensors", "pt").metadata()
    assert meta["lorakit_base_fingerprint"] in text
    assert "model.layers.0.self_attn.v_proj  2     8      4" in text  # rank 2 by rank_pattern
    assert "model.embed_tokens" in text and "KiB" in text

    assert main(["inspect", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"] == json.loads((adapter / "adapter_config.json").read_text())
    assert info["base_fingerprint"] == meta["lorakit_base_fingerprint"]
    assert info["lorakit_version"] == lorakit.__version__
    assert info["file_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    modules = {m["module"]: m for m in info["modules"]}
    assert len(modules) == 5  # q, v in two layers + the embedding
    assert modules["model.layers.1.self_attn.v_proj"]["rank"] == 2
    assert modules["model.layers.1.self_attn.q_proj"]["scaling"] == 2.0
    assert modules["model.embed_tokens"]["embedding"] is True
    model = lorakit.from_pretrained(tiny_llama(), adapter)
    assert info["parameters"] == sum(p.numel() for n, p in model.named_parameters() if "lora" in n)


def test_inspect_peft_adapter_and_errors(tmp_path: Path, capsys) -> None:
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["k_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    assert main(["inspect", str(tmp_path / "peft"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base_fingerprint"] is None and len(info["modules"]) == 2
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    assert "not recorded (not saved by lorakit)" in capsys.readouterr().out

    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "lorakit inspect: error:" in capsys.readouterr().err
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"\x01\x02")
    assert main(["inspect", str(tmp_path / "peft")]) == 2
    assert "adapter_model.safetensors is not a readable" in capsys.readouterr().err
