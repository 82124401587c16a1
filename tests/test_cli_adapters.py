"""`lorakit inspect` and `lorakit merge` on real files: tiny transformers models in tmp_path."""

from __future__ import annotations

import json
import shutil
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

PREDICT = Path(__file__).resolve().parents[1] / "examples" / "predict.py"
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


# -- finetune -> merge -> predict, on a base folder whose config names the bare BertModel -----
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bare base folder, finetune run folder): the demo's layout, tiny."""
    from tiny_hf import sentiment_records, tiny_model, write_jsonl

    root = tmp_path_factory.mktemp("flow")
    base = tiny_model(root / "base", "bert-base")  # architectures: ["BertModel"], as the demo
    data = write_jsonl(root / "train.jsonl", sentiment_records(24))
    argv = ["finetune", "--model", str(base), "--task", "seq-cls", "--data", str(data),
            "--out", str(root / "run"), "--max-steps", "2", "--threads", "1", "--progress", "none",
            "--lr", "0.05"]  # fmt: skip
    assert main(argv) == 0
    return base, root / "run"


TEXTS = ["the movie was great", "so awful", "a very nice book", "my sad day"]


def _predict_module():
    """examples/predict.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("predict", PREDICT)
    predict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(predict)
    return predict


def test_merge_a_finetune_adapter_onto_the_bare_base(finetuned, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base, run = finetuned
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--adapter", str(run / "adapter"),
                 "--out", str(out)]) == 0  # fmt: skip
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    assert merged.config.label2id == {"neg": 0, "pos": 1}
    adapted, _ = _predict_module().load(run)
    batch = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits,
                                   rtol=0, atol=1e-5)  # fmt: skip


def test_merge_without_task_info_names_the_class_problem(finetuned, tmp_path: Path, capsys):
    from lorakit.checkpoint.files import canonical, open_adapter
    from lorakit.checkpoint.save import write_files

    base, run = finetuned
    adapter = shutil.copytree(run / "adapter", tmp_path / "adapter")  # no run.json beside it
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out"]
    assert main([*argv, str(tmp_path / "task-recorded")]) == 0  # the adapter's task_type
    with open_adapter(adapter) as files:  # an adapter that records no task_type
        tensors, config = files.read(list(files.entries)), {**files.config, "task_type": None}
        metadata = {**files.metadata, "lorakit_config": canonical(config)}
    write_files(adapter, tensors, {k: v for k, v in metadata.items() if k != "format"}, config)
    assert main([*argv, str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "was trained on a model with a task head (its layers sit under 'bert.')" in err
    assert "names BertModel, the bare model; pass --task seq-cls" in err
    assert "another base model" not in err and not (tmp_path / "o").exists()
    assert main([*argv, str(tmp_path / "o"), "--task", "seq-cls"]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_merge_refuses_a_classifier_without_any_head(tmp_path: Path, capsys) -> None:
    from tiny_hf import tiny_model

    base = tiny_model(tmp_path / "base", "bert-base")
    model = BertForSequenceClassification.from_pretrained(base)
    lorakit.inject(model, lorakit.LoraConfig(targets=("query",)))  # head not saved
    lorakit.save_adapter(model, tmp_path / "adapter")
    argv = ["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"),
            "--task", "seq-cls", "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    assert "holds no classification head (modules_to_save is empty)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_predict_example_agrees_with_the_merged_model(finetuned, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base, run = finetuned
    done = subprocess.run([sys.executable, str(PREDICT), str(run), *TEXTS],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = tmp_path / "merged"  # an independent route to the same predictions
    assert main(["merge", "--base", str(base), "--adapter", str(run / "adapter"),
                 "--out", str(out)]) == 0  # fmt: skip
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = merged(**batch).logits.argmax(-1).tolist()
    want = [f"{merged.config.id2label[i]}\t{text}" for i, text in zip(ids, TEXTS)]
    assert done.stdout.splitlines() == want
