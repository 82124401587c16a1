"""Evaluation: accuracy and loss for seq-cls, loss and perplexity for causal-lm.

Each rank evaluates an equal-length shard (the last one padded with weight-0 rows, so that
FSDP ranks run the same number of forwards) and the sums are all-reduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .data import IGNORE_INDEX
from .distributed import DistEnv, all_sum
from .labelled_loss import labelled_logits_only
from .options import Task

Batch = dict[str, torch.Tensor]

METRIC = {"seq-cls": "accuracy", "causal-lm": "perplexity"}


def shard(n: int, env: DistEnv) -> tuple[list[int], int]:
    """This rank's indices of 0..n-1 (padded to ceil(n / world)) and how many are real."""
    per = math.ceil(n / env.world_size)
    own = list(range(env.rank * per, min(n, (env.rank + 1) * per)))
    return own + [0] * (per - len(own)), len(own)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset,
    task: Task,
    collate_fn: Callable[[Sequence[Any]], dict[str, torch.Tensor]],
    env: DistEnv,
    batch_size: int = 128,
) -> dict[str, float]:
    """{"loss", "accuracy"} (seq-cls) or {"loss", "perplexity"} (causal-lm) over `data`.

    Loss is the mean over examples (seq-cls) or over completion tokens (causal-lm).
    """
    was_training = model.training
    model.eval()
    indices, real = shard(len(data), env)
    totals = [0.0, 0.0, 0.0]  # loss sum, correct predictions, examples (or tokens)
    for start in range(0, len(indices), batch_size):
        rows = indices[start : start + batch_size]
        batch = {k: v.to(env.device) for k, v in collate_fn([data[i] for i in rows]).items()}
        labels = batch.pop("labels")
        keep = torch.arange(start, start + len(rows), device=env.device) < real
        sums = _BATCH_SUMS[task](model, batch, labels, keep)
        totals = [total + value for total, value in zip(totals, sums)]
    loss_sum, correct, count = all_sum(env, totals)
    model.train(was_training)
    return _metrics(task, loss_sum, correct, count)


def _seq_cls_sums(
    model: nn.Module, batch: Batch, labels: torch.Tensor, keep: torch.Tensor
) -> tuple[float, float, float]:
    """Over the kept rows: (sum of the losses, correct predictions, examples)."""
    logits = model(**batch).logits.float()
    loss_sum = F.cross_entropy(logits, labels, reduction="none")[keep].sum().item()
    correct = (logits.argmax(-1) == labels)[keep].sum().item()
    return loss_sum, correct, keep.sum().item()


def _causal_lm_sums(
    model: nn.Module, batch: Batch, labels: torch.Tensor, keep: torch.Tensor
) -> tuple[float, float, float]:
    """Over the kept rows: (sum of the completion tokens' losses, 0, completion tokens); the
    head runs only at labelled positions where `supports_labelled_loss` allows."""
    labels = labels.masked_fill(~keep[:, None], IGNORE_INDEX)
    count = (labels[:, 1:] != IGNORE_INDEX).sum().item()
    with labelled_logits_only(model) as only_labelled:
        if only_labelled:  # every rank runs the forward, even one with no labelled row
            mean = model(**batch, labels=labels).loss.item()
            return (mean * count if count else 0.0), 0.0, count
    logits = model(**batch).logits.float()
    # token t predicts token t + 1
    shifted, targets = logits[:, :-1], labels[:, 1:]
    loss_sum = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    ).item()
    return loss_sum, 0.0, (targets != IGNORE_INDEX).sum().item()


_BATCH_SUMS = {"seq-cls": _seq_cls_sums, "causal-lm": _causal_lm_sums}


def _metrics(task: Task, loss_sum: float, correct: float, count: float) -> dict[str, float]:
    """The mean loss, and accuracy (seq-cls) or perplexity (causal-lm)."""
    loss = loss_sum / max(count, 1.0)
    if task == "seq-cls":
        return {"loss": loss, "accuracy": correct / max(count, 1.0)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def majority_accuracy(train_labels: Sequence[int], eval_labels: Sequence[int]) -> float:
    """Accuracy of always predicting the most frequent training label (the floor to beat)."""
    if not eval_labels:
        return 0.0
    counts: dict[int, int] = {}
    for y in train_labels:
        counts[y] = counts.get(y, 0) + 1
    top = max(counts, key=lambda y: (counts[y], -y))
    return sum(1 for y in eval_labels if y == top) / len(eval_labels)
