"""How the next token is chosen from one row's logits: greedy, or temperature and top_p.

Each request samples from its own `torch.Generator`, seeded by the request's `seed`, so its
answer does not depend on which other requests share the batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import BadRequest


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax); above 0: sample from the top_p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise BadRequest(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        """The request's own random stream (None when greedy)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else random.SystemRandom().getrandbits(63)
        return torch.Generator().manual_seed(seed)


def sample(logits: Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """A token drawn from softmax(logits / temperature) cut to the smallest set of tokens whose
    probability reaches top_p (the most likely token is always kept). logits: (vocab,)."""
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # probability of the tokens ahead
        sorted_probs[before >= sampling.top_p] = 0
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))
