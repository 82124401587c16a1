"""lorakit.llm.generate: prompts and chats encoded, greedy and seeded sampling, streaming, and
the base vs each adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomise_lora
from llm_fixtures import tiny_chat_model

import lorakit
from lorakit.errors import AdapterError, ConfigError
from lorakit.llm import load_causal_lm
from lorakit.llm.generate import (
    compare,
    decoding_options,
    encode,
    generate,
    using_adapter,
)
from lorakit.llm.model import smollm2_folder

CHAT = [{"role": "user", "content": "good day"}]


@pytest.fixture(scope="module")
def tiny(tiny_chat_folder: Path):
    return load_causal_lm(tiny_chat_folder)


# -- encoding ------------------------------------------------------------------------------
def test_messages_go_through_the_chat_template(tiny) -> None:
    _, tokenizer = tiny
    chat = [{"role": "system", "content": "be nice"}, *CHAT]
    ids = encode(tokenizer, messages=chat)["input_ids"]
    # The template's text ("system: be nice\nuser: good day\nassistant:"), no [CLS]/[SEP].
    assert tokenizer.decode(ids[0]) == "system : be nice user : good day assistant :"
    plain = encode(tokenizer, prompt="good day")
    assert tokenizer.decode(plain["input_ids"][0]) == "[CLS] good day [SEP]"
    assert set(plain) == {"input_ids", "attention_mask"}  # no token_type_ids for a decoder


def test_prompt_and_messages_are_exclusive(tiny) -> None:
    _, tokenizer = tiny
    for kwargs in ({}, {"prompt": "hi", "messages": CHAT}):
        with pytest.raises(ConfigError, match="pass exactly one of prompt .* and messages"):
            encode(tokenizer, **kwargs)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], r"messages must be a non-empty list of \{role, content\}, got \[\]"),
        ({"role": "user"}, r"messages must be a non-empty list .* got \{'role': 'user'\}"),
        ([CHAT[0], {"role": "user"}], r"messages\[1\] must be \{\"role\": str, \"content\": str\}"),
        ([{"role": "user", "content": 3}], r"messages\[0\] must be .*'content': 3"),
    ],
)
def test_malformed_messages(tiny, messages, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        encode(tiny[1], messages=messages)


def test_an_empty_prompt(tiny) -> None:
    class NoSpecialTokens:  # a tokenizer that adds no BOS, like many decoder tokenizers
        def __call__(self, text: str, return_tensors: str):
            return tiny[1](text, add_special_tokens=False, return_tensors=return_tensors)

    with pytest.raises(ConfigError, match="the prompt is empty: it encodes to no tokens"):
        encode(NoSpecialTokens(), prompt="")


def test_messages_need_a_chat_template(tmp_path: Path) -> None:
    _, tokenizer = load_causal_lm(tiny_chat_model(tmp_path, chat_template=None))
    with pytest.raises(ConfigError, match="the tokenizer has no chat template"):
        encode(tokenizer, messages=CHAT)


@pytest.mark.parametrize(
    "options, message",
    [
        ((0, 0.0, 1.0), "max_new_tokens must be an integer >= 1, got 0"),
        ((True, 0.0, 1.0), "max_new_tokens must be an integer >= 1, got True"),
        ((4, -0.5, 1.0), r"temperature must be >= 0 \(0: greedy\), got -0.5"),
        ((4, float("nan"), 1.0), "temperature must be >= 0"),
        ((4, 1.0, 0.0), r"top_p must be in \(0, 1\], got 0.0"),
        ((4, 1.0, 1.5), r"top_p must be in \(0, 1\], got 1.5"),
    ],
)
def test_bad_decoding_options(options: tuple, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        decoding_options(*options)


# -- decoding ------------------------------------------------------------------------------
def test_greedy_is_the_argmax_at_every_step(tiny) -> None:
    model, tokenizer = tiny
    text = generate(model, tokenizer, prompt="good day", max_new_tokens=6)
    ids = encode(tokenizer, prompt="good day")["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    expected = ids[0, -6:]
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert text.strip()  # the tiny model's argmax tokens here are ordinary words


def test_streamed_pieces_make_the_answer(tiny) -> None:
    model, tokenizer = tiny
    pieces: list[str] = []
    text = generate(model, tokenizer, messages=CHAT, max_new_tokens=8, stream=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == text
    assert generate(model, tokenizer, messages=CHAT, max_new_tokens=8) == text


def test_seeded_sampling_repeats_and_leaves_the_global_rng(tiny) -> None:
    model, tokenizer = tiny
    options = dict(prompt="good day", max_new_tokens=8, temperature=1.5, top_p=0.95)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = generate(model, tokenizer, **options, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(model, tokenizer, **options, seed=1) == first
    others = {generate(model, tokenizer, **options, seed=s) for s in range(2, 6)}
    assert others - {first}  # other seeds sample other answers
    greedy = generate(model, tokenizer, prompt="good day", max_new_tokens=8)
    assert first != greedy


# -- base vs adapters -----------------------------------------------------------------------
@pytest.fixture
def adapted(tiny_chat_folder: Path):
    model, tokenizer = load_causal_lm(tiny_chat_folder)
    for name, targets in (("a", ("q_proj", "v_proj")), ("b", ("o_proj",))):
        lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=targets), adapter_name=name)
    randomise_lora(model, std=1.0)
    lorakit.set_active(model, "b")
    return model, tokenizer


def test_compare_answers_with_each_adapter_alone(adapted, tiny) -> None:
    model, tokenizer = adapted
    answers = compare(model, tokenizer, [None, "a", "b"], messages=CHAT, max_new_tokens=6)
    assert list(answers) == ["base", "a", "b"]
    plain_model = tiny[0]
    assert answers["base"] == generate(plain_model, tokenizer, messages=CHAT, max_new_tokens=6)
    assert answers["b"] == generate(model, tokenizer, messages=CHAT, max_new_tokens=6)
    lorakit.set_active(model, "a")
    assert answers["a"] == generate(model, tokenizer, messages=CHAT, max_new_tokens=6)
    assert len(set(answers.values())) == 3  # the adapters change the answer


def test_using_adapter_restores_the_state(adapted) -> None:
    model, _ = adapted
    grads = [p.requires_grad for p in model.parameters()]
    for name in ("a", None):
        with using_adapter(model, name):
            assert lorakit.active_adapters(model) == (("a",) if name else ("b",))
        assert lorakit.active_adapters(model) == ("b",)
        assert [p.requires_grad for p in model.parameters()] == grads


def test_compare_refuses_unknown_and_repeated_names(adapted) -> None:
    model, tokenizer = adapted
    pieces: list[str] = []
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['c'\]; the model has"):
        compare(model, tokenizer, [None, "c"], prompt="hi", stream=pieces.append)
    assert pieces == []  # refused before the first answer
    with pytest.raises(ConfigError, match=r"adapters lists a name twice: \['a', 'a'\]"):
        compare(model, tokenizer, ["a", "a"], prompt="hi")


# -- the real model -----------------------------------------------------------------------------
def test_smollm2_answers_a_chat(smollm2_cache: Path) -> None:
    model, tokenizer = load_causal_lm(smollm2_folder(smollm2_cache))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    answer = generate(model, tokenizer, messages=chat, max_new_tokens=12)
    assert "Paris" in answer
    assert generate(model, tokenizer, messages=chat, max_new_tokens=12) == answer
