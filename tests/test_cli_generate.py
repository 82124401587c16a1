"""`lorakit generate`: streamed answers, the base and each adapter under a heading, one-line
errors with exit status 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import randomise_lora

import lorakit
from lorakit.cli import main
from lorakit.llm import load_causal_lm
from lorakit.llm.generate import generate

CHAT = [{"role": "user", "content": "good day"}]


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def saved_adapter(model_folder: Path, out: Path, seed: int) -> Path:
    model, _ = load_causal_lm(model_folder)
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("q_proj", "v_proj")))
    randomise_lora(model, std=1.0, seed=seed)
    return lorakit.save_adapter(model, out)


def test_prompt_streams_the_answer(capsys, tiny_chat_folder: Path) -> None:
    code, out, _ = run(capsys, "--model", tiny_chat_folder, "--prompt", "good day",
                       "--max-new-tokens", 5)  # fmt: skip
    model, tokenizer = load_causal_lm(tiny_chat_folder)
    expected = generate(model, tokenizer, prompt="good day", max_new_tokens=5)
    assert code == 0 and out == expected + "\n"
    code, quiet, _ = run(capsys, "--model", tiny_chat_folder, "--prompt", "good day",
                         "--max-new-tokens", 5, "--no-stream")  # fmt: skip
    assert code == 0 and quiet == out


@pytest.mark.parametrize("wrapped", [False, True])
def test_messages_file(capsys, tiny_chat_folder: Path, tmp_path: Path, wrapped: bool) -> None:
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"messages": CHAT} if wrapped else CHAT))
    code, out, _ = run(capsys, "--model", tiny_chat_folder, "--messages", path,
                       "--max-new-tokens", 4, "--temperature", 1.0, "--seed", 3)  # fmt: skip
    model, tokenizer = load_causal_lm(tiny_chat_folder)
    expected = generate(model, tokenizer, messages=CHAT, max_new_tokens=4, temperature=1.0, seed=3)
    assert code == 0 and out == expected + "\n"


def test_base_and_adapters_side_by_side(capsys, tiny_chat_folder: Path, tmp_path: Path) -> None:
    first = saved_adapter(tiny_chat_folder, tmp_path / "first", seed=1)
    second = saved_adapter(tiny_chat_folder, tmp_path / "second", seed=2)
    adapters = ["--adapter", first, "--adapter", second]
    code, out, _ = run(capsys, "--model", tiny_chat_folder, *adapters, "--prompt", "good day",
                       "--max-new-tokens", 5)  # fmt: skip
    assert code == 0
    model, tokenizer = load_causal_lm(tiny_chat_folder)
    answers = [generate(model, tokenizer, prompt="good day", max_new_tokens=5)]
    for path in (first, second):
        adapted = lorakit.from_pretrained(load_causal_lm(tiny_chat_folder)[0], path)
        answers.append(generate(adapted, tokenizer, prompt="good day", max_new_tokens=5))
    assert len(set(answers)) == 3
    assert out == (
        f"=== base ===\n{answers[0]}\n=== adapter {first} ===\n{answers[1]}\n"
        f"=== adapter {second} ===\n{answers[2]}\n"
    )


@pytest.mark.parametrize(
    "argv",
    [["--prompt", "hi", "--messages", "chat.json"], []],
    ids=["both", "neither"],
)
def test_prompt_xor_messages(capsys, tiny_chat_folder: Path, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(tiny_chat_folder), *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    if argv:
        assert "argument --messages: not allowed with argument --prompt" in err
    else:
        assert "one of the arguments --prompt --messages is required" in err


def bad_chat(folder: Path) -> Path:
    (folder / "bad.json").write_text('[{"role": "user"}]')
    return folder / "bad.json"


def not_json(folder: Path) -> Path:
    (folder / "broken.json").write_text("[{")
    return folder / "broken.json"


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda d, m: ["--model", d / "none", "--prompt", "hi"],
         r"model '.*none' is not a folder; pass a local transformers model folder or 'smollm2'"),
        (lambda d, m: ["--model", m, "--messages", d / "none.json"],
         r"--messages .*none.json: cannot read: No such file or directory"),
        (lambda d, m: ["--model", m, "--messages", not_json(d)],
         r"--messages .*broken.json: not valid JSON \(Expecting"),
        (lambda d, m: ["--model", m, "--messages", bad_chat(d)],
         r"--messages .*bad.json: messages\[0\] must be \{\"role\": str, \"content\": str\}"),
        (lambda d, m: ["--model", m, "--prompt", "hi", "--top-p", 0],
         r"top_p must be in \(0, 1\], got 0.0"),
        (lambda d, m: ["--model", m, "--prompt", "hi", "--adapter", d / "none"],
         r"adapter folder .*none"),
    ],
    ids=["model", "messages-missing", "messages-json", "messages-shape", "top-p", "adapter"],
)  # fmt: skip
def test_errors_are_one_line(capsys, tiny_chat_folder: Path, tmp_path: Path, make_argv, message):
    code, out, err = run(capsys, *make_argv(tmp_path, tiny_chat_folder))
    assert code == 2 and out == ""
    assert err.startswith("lorakit generate: error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_smollm2_end_to_end(capsys, monkeypatch, smollm2_cache: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(smollm2_cache))
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"role": "user", "content": "What is the capital of France?"}]))
    code, out, err = run(capsys, "--model", "smollm2", "--messages", path,
                         "--max-new-tokens", 12)  # fmt: skip
    assert code == 0 and "converting" not in err  # the cache is used, not rebuilt
    assert "Paris" in out and out.endswith("\n")
