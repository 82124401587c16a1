"""Tests for lorakit.train.exact_match: the prompt to generate from is exactly what the
model saw before the answer in training, and the reference is that answer."""

from __future__ import annotations

import pytest
from chat_tokenizer import chatml_tokenizer

from lorakit.train.data import IGNORE_INDEX, LINE_KEY, CausalLMDataset, DataError
from lorakit.train.exact_match import exact_match, prompt_and_reference

SYSTEM = {"role": "system", "content": "convert the date"}
USER = {"role": "user", "content": "march the fifth"}
ASSISTANT = {"role": "assistant", "content": "2021-03-05"}


@pytest.fixture(scope="module")
def chatml():
    """A WordPiece tokenizer with a ChatML template."""
    return chatml_tokenizer()


def test_a_chat_prompt_is_every_turn_before_the_last_answer_with_the_generation_prompt(chatml):
    later = {"role": "user", "content": "and the sixth"}
    answer = {"role": "assistant", "content": "2021-03-06"}
    record = {"messages": [SYSTEM, USER, ASSISTANT, later, answer]}
    ids, reference = prompt_and_reference(record, chatml)
    assert reference == "2021-03-06"
    text = chatml.apply_chat_template(
        record["messages"][:3] + [later], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == chatml(text, add_special_tokens=False)["input_ids"]


def test_a_turn_after_the_last_answer_is_not_in_the_prompt(chatml):
    thanks = {"role": "user", "content": "thanks"}
    ids, reference = prompt_and_reference({"messages": [USER, ASSISTANT, thanks]}, chatml)
    assert reference == "2021-03-05"
    assert ids == prompt_and_reference({"messages": [USER, ASSISTANT]}, chatml)[0]


@pytest.mark.parametrize(
    "record",
    [
        {"messages": [SYSTEM, USER, ASSISTANT]},
        {"messages": [USER, ASSISTANT]},
        {"prompt": "march the fifth", "completion": "2021-03-05"},
    ],
)
def test_the_prompt_is_the_unlabelled_start_of_the_training_example(chatml, record):
    ids, reference = prompt_and_reference(record, chatml)
    example = CausalLMDataset([record], chatml, max_length=64, path="d.jsonl")[0]
    n = len(ids)
    assert example["input_ids"][:n] == ids
    assert example["labels"][:n] == [IGNORE_INDEX] * n
    assert example["labels"][n] != IGNORE_INDEX  # the answer starts right after
    assert reference == "2021-03-05"


def test_a_text_record_has_no_reference(chatml):
    with pytest.raises(DataError) as caught:
        prompt_and_reference({"text": "a b", LINE_KEY: 7}, chatml, "d.jsonl")
    assert str(caught.value) == (
        "d.jsonl, line 7: exact match needs 'prompt' and 'completion', or 'messages' "
        "records (a 'text' record has no reference answer)"
    )


def test_a_chat_needs_a_chat_template(chatml):
    saved, chatml.chat_template = chatml.chat_template, None
    try:
        with pytest.raises(DataError, match="need a tokenizer with a chat template"):
            prompt_and_reference({"messages": [USER, ASSISTANT]}, chatml)
    finally:
        chatml.chat_template = saved


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("2021-03-05", "2021-03-05", True),
        (" 2021-03-05\n", "2021-03-05", True),
        ("2021-03-05", "\t2021-03-05 ", True),
        ("2021-03-05.", "2021-03-05", False),
        ("2021-3-5", "2021-03-05", False),
        ("The date is 2021-03-05", "2021-03-05", False),
        ("Yes", "yes", False),  # case counts
        ("", "2021-03-05", False),
    ],
)
def test_exact_match_strips_whitespace_and_nothing_else(answer, reference, expected):
    assert exact_match(answer, reference) is expected
