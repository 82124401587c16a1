"""Causal-LM loss with the output head run only where there is a label.

With completion-only or assistant-only labels most positions carry label -100, yet a plain
`model(**batch, labels=...)` computes the (tokens, vocab) logits everywhere and throws most of
them away. Here the decoder body runs as usual, then the head and the cross-entropy run on
the shifted positions whose label is not -100 only, in chunks of rows so the logits of many
labelled positions never exist at once (each chunk is recomputed in the backward). The loss
is the mean over labelled positions, as `transformers` computes it, and so are the gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_ROWS = 2048
# Config fields of heads that are more than a Linear: their logits are rescaled or capped.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def supports_labelled_loss(model: nn.Module) -> bool:
    """True for a `transformers` causal LM whose logits are its Linear head of the body's
    last hidden state, with nothing after it."""
    config = getattr(model, "config", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    body = getattr(model, "base_model", None)
    if config is None or not isinstance(head, nn.Linear) or body is None or body is model:
        return False
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in _HEAD_EXTRAS)


def labelled_loss(
    model: nn.Module, labels: Tensor, chunk_rows: int = CHUNK_ROWS, **inputs: Any
) -> Tensor:
    """Mean cross-entropy over the positions whose next-token label is not -100 (NaN if none,
    as in `transformers`); `inputs` go to the model's body (input_ids, attention_mask, ...)."""
    hidden = model.base_model(**inputs).last_hidden_state
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE_INDEX
    rows, wanted = hidden[:, :-1][keep], targets[keep]
    if wanted.numel() == 0:
        return hidden.sum() * float("nan")
    head = model.get_output_embeddings()
    total = sum(
        _chunk_loss(head, rows[i : i + chunk_rows], wanted[i : i + chunk_rows])
        for i in range(0, wanted.numel(), chunk_rows)
    )
    return total / wanted.numel()


def _chunk_loss(head: nn.Module, rows: Tensor, wanted: Tensor) -> Tensor:
    """Summed cross-entropy of one chunk; its logits are freed and recomputed in backward."""
    if not torch.is_grad_enabled():
        return _cross_entropy_sum(head, rows, wanted)
    return checkpoint(_cross_entropy_sum, head, rows, wanted, use_reentrant=False)


def _cross_entropy_sum(head: nn.Module, rows: Tensor, wanted: Tensor) -> Tensor:
    return F.cross_entropy(head(rows).float(), wanted, reduction="sum")


@contextmanager
def labelled_logits_only(model: nn.Module) -> Iterator[bool]:
    """Within the block, `model(**batch)` with `labels` returns only `.loss`, computed by
    `labelled_loss`; calls without labels run the model's own forward. Yields False (and
    changes nothing) for a model `supports_labelled_loss` rejects. Works under DDP/FSDP
    wrappers, which call the model's `forward`."""
    if getattr(model.forward, "labelled_logits_only", False):
        yield True  # already inside such a block: it stays in charge
        return
    if not supports_labelled_loss(model):
        yield False
        return
    own_forward = model.forward

    def forward(*args: Any, **inputs: Any) -> Any:
        labels = inputs.pop("labels", None)
        if args or labels is None:
            return own_forward(*args, labels=labels, **inputs)
        return SimpleNamespace(loss=labelled_loss(model, labels, **inputs), logits=None)

    forward.labelled_logits_only = True  # type: ignore[attr-defined]
    model.forward = forward
    try:
        yield True
    finally:
        del model.forward
