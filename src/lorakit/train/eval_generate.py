"""Evaluation by generation: greedy answers to held-out prompts, scored by exact match.

The prompt is what the model saw before the reference answer in training (a chat rendered by
the tokenizer's template up to the last assistant turn, or a `prompt`), so a model that
learned the training data's answers can reproduce them word for word. Prompts run in batches,
left-padded; a `use_cache` switched off for gradient checkpointing is switched on here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .exact_match import exact_match, prompt_and_reference
from .records import Record

BATCH = 16
SHOWN = 3  # example answers kept for the summary


@dataclass(frozen=True)
class Answer:
    """One held-out prompt: the question (the last user turn, or the prompt), the reference
    completion and the model's answer."""

    question: str
    reference: str
    answer: str


@dataclass(frozen=True)
class GenerationScore:
    """Exact match over `n` prompts, and the first few answers."""

    exact_match: float
    n: int
    examples: tuple[Answer, ...]


def score_generation(
    model: nn.Module,
    tokenizer: Any,
    records: list[Record],
    path: str | Path,
    n: int,
    max_new_tokens: int,
) -> GenerationScore:
    """Greedy answers of `model` to the first `n` of `records`, scored by exact match.

    Raises:
        DataError: a record has no reference answer (a `text` record), naming it.
    """
    chosen = records[:n]
    prompts = [prompt_and_reference(r, tokenizer, path) for r in chosen]
    answers: list[str] = []
    for start in range(0, len(prompts), BATCH):
        ids = [p for p, _ in prompts[start : start + BATCH]]
        answers += greedy_answers(model, tokenizer, ids, max_new_tokens)
    scored = [
        Answer(_question(r), reference, answer)
        for r, (_, reference), answer in zip(chosen, prompts, answers)
    ]
    hits = sum(exact_match(a.answer, a.reference) for a in scored)
    share = hits / len(scored) if scored else 0.0
    return GenerationScore(share, len(scored), tuple(scored[:SHOWN]))


def check_references(records: list[Record], tokenizer: Any, path: str | Path, n: int) -> None:
    """Raise DataError, before any training, if one of the first `n` records has no
    reference answer to score."""
    for record in records[:n]:
        prompt_and_reference(record, tokenizer, path)


@torch.no_grad()
def greedy_answers(
    model: nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int
) -> list[str]:
    """The decoded new text of greedy generation from each prompt (token ids), batched."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            use_cache=True,
        )
    finally:
        model.train(was_training)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def _question(record: Record) -> str:
    """What was asked: the last user turn of a chat, or the prompt."""
    if "messages" in record:
        users = [m["content"] for m in record["messages"] if m.get("role") == "user"]
        return users[-1] if users else ""
    return str(record.get("prompt", ""))
