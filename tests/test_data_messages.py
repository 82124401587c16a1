"""Tests for ``messages`` (chat) records: their check, and the encoder that renders them with
the tokenizer's own chat template and labels the assistant turns only."""

from __future__ import annotations

import json

import pytest
from chat_tokenizer import CHATML, chatml_tokenizer, smollm2_tokenizer

from lorakit.train.data import (
    IGNORE_INDEX,
    LINE_KEY,
    CausalLMDataset,
    Collator,
    DataError,
    pad_token_id,
    read_records,
    validate_records,
)
from lorakit.train.formats import record_format

SYSTEM = {"role": "system", "content": "be brief"}
USER = {"role": "user", "content": "what is two plus two"}
ASSISTANT = {"role": "assistant", "content": "four of course"}


@pytest.fixture(scope="module")
def chatml():
    """A WordPiece tokenizer with a ChatML template."""
    return chatml_tokenizer()


def encode(tokenizer, messages, max_length=128, side="right", line=3):
    """The one example CausalLMDataset makes of a ``messages`` record."""
    record = {"messages": messages, LINE_KEY: line}
    return CausalLMDataset([record], tokenizer, max_length, "c.jsonl", side)[0]


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """The maximal runs of labels that are not IGNORE_INDEX."""
    runs: list[list[int]] = [[]]
    for label in labels:
        if label != IGNORE_INDEX:
            runs[-1].append(label)
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


# --------------------------------------------------------------------------- the check


OBJECTS = "{'role': ..., 'content': ...} objects"


def line(messages) -> str:
    """One JSONL line holding a ``messages`` record."""
    return json.dumps({"messages": messages}) + "\n"


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], f"field 'messages' must be a non-empty list of {OBJECTS}, got []"),
        ("hi", f"field 'messages' must be a non-empty list of {OBJECTS}, got 'hi'"),
        ([USER, "hi"], "messages[1]: must be an object with 'role' and 'content', got 'hi'"),
        ([{"content": "hi"}], "messages[0]: missing field 'role'"),
        ([USER, {"role": "assistant"}], "messages[1]: missing field 'content'"),
        (
            [SYSTEM, USER, {"role": "bot", "content": "four"}],
            "messages[2].role: unknown role 'bot' (expected system, user or assistant)",
        ),
        (
            [{"role": "user", "content": 4}, ASSISTANT],
            "messages[0].content: must be a string, got 4",
        ),
        (
            [USER, {"role": "assistant", "content": "  "}],
            "messages[1].content: an assistant turn must be a non-empty string",
        ),
        (
            [SYSTEM, USER],
            "field 'messages' has no assistant turn (the loss is on assistant turns only)",
        ),
    ],
)
def test_bad_messages_are_refused_naming_file_line_and_field(tmp_path, messages, message):
    path = tmp_path / "data.jsonl"
    path.write_text(line([USER, ASSISTANT]) + line(messages), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        validate_records(read_records(path), "causal-lm", path)
    assert str(caught.value) == f"{path}, line 2: {message}"


@pytest.mark.parametrize(
    "messages",
    [
        [USER, ASSISTANT],  # system optional
        [SYSTEM, USER, ASSISTANT, USER, ASSISTANT],
        [SYSTEM, USER, ASSISTANT, {"role": "user", "content": ""}],  # trailing user turn
        [{**USER, "name": "ann"}, ASSISTANT],  # other keys are ignored
    ],
)
def test_good_messages_are_accepted(tmp_path, messages):
    path = tmp_path / "data.jsonl"
    path.write_text(line(messages), encoding="utf-8")
    validate_records(read_records(path), "causal-lm", path)


def test_messages_mark_the_format_after_text_and_prompt_completion():
    assert record_format({"messages": [USER]}, "causal-lm", "d").name == "messages"
    assert record_format({"messages": []}, "causal-lm", "d").name == "messages"
    assert record_format({"text": "a", "messages": [USER]}, "causal-lm", "d").name == "text"
    both = {"prompt": "q", "completion": "a", "messages": [USER]}
    assert record_format(both, "causal-lm", "d").name == "prompt+completion"


# --------------------------------------------------------------------------- labels


def test_only_the_assistant_turn_is_labelled(chatml):
    example = encode(chatml, [SYSTEM, USER, ASSISTANT])
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    assert all(y in (IGNORE_INDEX, x) for x, y in zip(ids, labels))
    assert [chatml.decode(run) for run in labelled_runs(labels)] == ["four of course <|im_end|>"]
    text = chatml.apply_chat_template([SYSTEM, USER, ASSISTANT], tokenize=False)
    assert ids == chatml(text, add_special_tokens=False)["input_ids"]


def test_every_assistant_turn_of_a_multi_turn_chat_is_labelled(chatml):
    second = {"role": "assistant", "content": "five"}
    again = {"role": "user", "content": "and three"}
    example = encode(chatml, [SYSTEM, USER, ASSISTANT, again, second])
    runs = labelled_runs(example["labels"])
    assert [chatml.decode(run) for run in runs] == ["four of course <|im_end|>", "five <|im_end|>"]


def test_the_system_turn_is_optional(chatml):
    with_system = encode(chatml, [SYSTEM, USER, ASSISTANT])
    without = encode(chatml, [USER, ASSISTANT])
    assert len(without["input_ids"]) == len(with_system["input_ids"]) - 5  # 5 system tokens
    assert labelled_runs(without["labels"]) == labelled_runs(with_system["labels"])


def test_chat_examples_batch_with_masked_padding(chatml):
    long, short = encode(chatml, [SYSTEM, USER, ASSISTANT]), encode(chatml, [USER, ASSISTANT])
    batch = Collator(pad_token_id(chatml))([long, short])
    width = len(long["input_ids"])
    assert batch["labels"][1, len(short["labels"]) :].tolist() == [IGNORE_INDEX] * 5
    assert batch["input_ids"].shape == (2, width)


# --------------------------------------------------------------------------- max_length


def test_right_truncation_refuses_to_cut_the_last_assistant_turn(chatml):
    full = encode(chatml, [SYSTEM, USER, ASSISTANT])
    n = len(full["input_ids"])
    encode(chatml, [SYSTEM, USER, ASSISTANT], max_length=n)  # fits exactly
    with pytest.raises(DataError) as caught:
        encode(chatml, [SYSTEM, USER, ASSISTANT], max_length=n - 1)
    assert str(caught.value) == (
        f"c.jsonl, line 3: messages[2]: the conversation is {n} tokens and its last assistant "
        f"turn ends at token {n}, past max_length={n - 1} (truncation_side='right' keeps the "
        "start; 'left' cuts earlier turns)"
    )


def test_right_truncation_may_cut_turns_after_the_last_assistant_turn(chatml):
    whole = encode(chatml, [USER, ASSISTANT])
    n = len(whole["input_ids"])
    example = encode(chatml, [USER, ASSISTANT, {"role": "user", "content": "thanks"}], n)
    assert example == whole


def test_left_truncation_cuts_earlier_turns_and_keeps_the_last_assistant_turn(chatml):
    whole = encode(chatml, [USER, ASSISTANT])
    n = len(whole["input_ids"])
    example = encode(chatml, [SYSTEM, USER, ASSISTANT], max_length=n, side="left")
    assert example == whole  # exactly the 5 system tokens were cut
    with pytest.raises(DataError) as caught:
        encode(chatml, [SYSTEM, USER, ASSISTANT], max_length=5, side="left")
    assert str(caught.value) == (
        f"c.jsonl, line 3: messages[2]: the conversation is {n + 5} tokens and its last "
        "assistant turn with the turns after it is 6, more than max_length=5 "
        "(truncation_side='left' keeps that turn whole)"
    )


# --------------------------------------------------------------------------- templates


def test_a_tokenizer_without_a_chat_template_is_refused(chatml):
    saved, chatml.chat_template = chatml.chat_template, None
    try:
        with pytest.raises(DataError) as caught:
            encode(chatml, [USER, ASSISTANT])
    finally:
        chatml.chat_template = saved
    assert str(caught.value) == (
        "c.jsonl, line 3: 'messages' records need a tokenizer with a chat template, and this "
        "one has none (use 'prompt' + 'completion' records, or a model whose "
        "tokenizer_config.json has a chat_template)"
    )


def test_a_template_whose_prefixes_do_not_match_is_refused(chatml):
    saved = chatml.chat_template
    chatml.chat_template = "turns {{ messages | length }} " + CHATML  # the count changes
    try:
        with pytest.raises(DataError) as caught:
            encode(chatml, [USER, ASSISTANT])
    finally:
        chatml.chat_template = saved
    assert str(caught.value) == (
        "c.jsonl, line 3: messages[1]: the chat template's rendering of messages[:1] "
        "(add_generation_prompt=True) does not tokenise to a prefix of the whole "
        "conversation, so this assistant turn's tokens cannot be found"
    )


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's tokenizer and chat template."""
    return smollm2_tokenizer()


def test_smollm2_template_labels_the_answer_and_its_end_of_turn(smollm2):
    question = {"role": "user", "content": "March 5, 2021"}
    answer = {"role": "assistant", "content": "2021-03-05"}
    again = {"role": "user", "content": "and the day after?"}
    answer2 = {"role": "assistant", "content": "2021-03-06"}
    example = encode(smollm2, [question, answer, again, answer2])
    assert [smollm2.decode(run) for run in labelled_runs(example["labels"])] == [
        "2021-03-05<|im_end|>\n",
        "2021-03-06<|im_end|>\n",
    ]
    # No system turn given: the template wrote its default one, unlabelled.
    assert smollm2.decode(example["input_ids"]).startswith("<|im_start|>system\n")


# --------------------------------------------------------------------------- end to end

# Words and [SEP] only: the tiny model's vocabulary is the MiniLM tokenizer's, unchanged.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m.role }} : {{ m.content }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def test_finetune_trains_a_causal_lm_on_chats(tmp_path):
    from tiny_hf import completion_records, tiny_model, write_jsonl
    from transformers import AutoTokenizer

    from lorakit.train import TrainOptions, finetune

    model = tiny_model(tmp_path / "llama", "llama-causal")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = PLAIN_TEMPLATE
    tokenizer.save_pretrained(model)
    chats = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in completion_records(64)
    ]
    data = write_jsonl(tmp_path / "chats.jsonl", chats)
    options = TrainOptions(
        model=str(model),
        data=str(data),
        out=str(tmp_path / "out"),
        batch_size=8,
        epochs=3,
        lr=1e-2,
        warmup_steps=2,
        eval_every=0,
        save_every=0,
        threads=1,
        progress="none",
    )
    result = finetune(options)
    assert result.task == "causal-lm"
    assert result.train.eval_after["loss"] < result.train.eval_before["loss"]
