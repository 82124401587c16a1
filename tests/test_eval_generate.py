"""Evaluation by generation: greedy answers to held-out prompts, exact match before and after
training, in the summary, run.json and metrics.jsonl; batched answers equal single ones."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from tiny_hf import tiny_model, write_jsonl

from lorakit.errors import ConfigError
from lorakit.train import TrainOptions
from lorakit.train.data import DataError
from lorakit.train.eval_generate import greedy_answers, score_generation
from lorakit.train.finetune import finetune
from lorakit.train.model import load_model, load_tokenizer
from lorakit.train.report import read_metrics

QUESTIONS = ("red", "blue", "green", "black", "white", "brown", "pink", "gray")


def _chat(question: str, answer: str = "yes") -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}  # fmt: skip


def _options(tmp_path: Path, folder: Path, **overrides) -> TrainOptions:
    train = write_jsonl(tmp_path / "train.jsonl", [_chat(q) for q in QUESTIONS * 4])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [_chat(q) for q in QUESTIONS[:5]])
    values = dict(model=str(folder), data=str(train), eval_file=str(held_out),
                  out=str(tmp_path / "run"), max_steps=40, batch_size=8, lr=1e-2, warmup_steps=0,
                  eval_every=0, log_every=0, save_every=0, progress="none", eval_generate=4,
                  max_new_tokens=1)  # fmt: skip
    return TrainOptions(**{**values, **overrides})


def test_exact_match_before_and_after_training(tmp_path: Path, tiny_chat_folder: Path) -> None:
    result = finetune(_options(tmp_path, tiny_chat_folder))
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    before, after = run["eval_generate"]["before"], run["eval_generate"]["after"]
    assert before["n"] == after["n"] == 4
    assert before["exact_match"] < 0.5 and after["exact_match"] == 1.0
    assert [e["answer"].strip() for e in after["examples"]] == ["yes"] * 3
    assert after["examples"][0]["question"] == "red"
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    events = {r["event"]: r for r in metrics if "event" in r}
    assert events["eval_generate after"]["exact_match"] == 1.0
    assert events["eval_generate after"]["step"] == 40
    assert events["eval_generate before"]["step"] == 0
    assert "exact match" in result.summary and "1.00 after (4 held-out prompts)" in result.summary
    assert "example 1" in result.summary and "(expected 'yes')" in result.summary


def test_batched_answers_equal_one_at_a_time(tiny_chat_folder: Path) -> None:
    model = load_model(tiny_chat_folder, "causal-lm")
    tokenizer = load_tokenizer(tiny_chat_folder)
    prompts = [tokenizer(q)["input_ids"] for q in ("red", "a much longer question here", "hi")]
    batched = greedy_answers(model, tokenizer, prompts, max_new_tokens=5)
    alone = [greedy_answers(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == alone and all(a.strip() for a in batched)
    assert not model.training  # load_model's eval mode is kept


def test_score_counts_exact_matches_only(tiny_chat_folder: Path, monkeypatch) -> None:
    import lorakit.train.eval_generate as eg

    model = load_model(tiny_chat_folder, "causal-lm")
    tokenizer = load_tokenizer(tiny_chat_folder)
    records = [_chat("red", "yes"), _chat("blue", "no"), _chat("green", "maybe")]
    answers = [" yes\n", "No", "maybe"]
    monkeypatch.setattr(eg, "greedy_answers", lambda m, t, p, n: answers[: len(p)])
    score = score_generation(model, tokenizer, records, "eval.jsonl", n=3, max_new_tokens=2)
    assert score.n == 3 and score.exact_match == pytest.approx(2 / 3)
    assert [a.reference for a in score.examples] == ["yes", "no", "maybe"]


def test_refused_for_classification(tmp_path: Path) -> None:
    folder = tiny_model(tmp_path / "bert")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": "pos"},
                                              {"text": "bad", "label": "neg"}] * 10)  # fmt: skip
    options = TrainOptions(
        model=str(folder), data=str(data), out=str(tmp_path / "o"), eval_generate=2
    )
    expected = "eval_generate scores generated answers, which needs task 'causal-lm', not 'seq-cls'"
    with pytest.raises(ConfigError, match=expected):
        finetune(options)


def test_text_records_have_no_reference(tmp_path: Path, tiny_chat_folder: Path, monkeypatch):
    ft = importlib.import_module("lorakit.train.finetune")  # the module, not the function
    monkeypatch.setattr(ft, "prepare_model", lambda *a: pytest.fail("checked after loading"))
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": f"some words {i}"} for i in range(20)])
    options = TrainOptions(model=str(tiny_chat_folder), data=str(data), out=str(tmp_path / "o"),
                           max_steps=1, progress="none", eval_generate=2)  # fmt: skip
    expected = "exact match needs 'prompt' and 'completion', or 'messages'"
    with pytest.raises(DataError, match=expected):
        finetune(options)


def test_refused_with_fsdp() -> None:
    with pytest.raises(ConfigError, match="eval_generate with fsdp is not supported"):
        TrainOptions(eval_generate=3, fsdp=True)
    assert torch.is_grad_enabled()
