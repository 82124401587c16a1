"""LoRA for `nn.Embedding`: y = E[ids] + s * (A^T[ids]) B^T, A (r, vocab), B (dim, r)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LoraLayer
from .lora import LoRA


class EmbeddingLoraMixin(LoraLayer):
    """Mixin: the per-type math of an embedding table (vocab, dim)."""

    is_embedding = True
    supports_dora = True

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        vocab, dim = self.weight.shape
        return vocab, dim, ()

    def lora_delta(self, adapter: LoRA, x: Tensor) -> Tensor:
        # Look up columns of A as if A^T were an embedding table: (..., r). Dropout does not
        # apply to integer ids (PEFT does the same).
        h = F.embedding(x, adapter.lora_A.t(), padding_idx=self.padding_idx)
        return h @ adapter.lora_B.t() * adapter.scaling

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.t()  # (dim, vocab) -> (vocab, dim)


class LoRAEmbedding(EmbeddingLoraMixin, nn.Embedding):
    """An `nn.Embedding` with LoRA adapters; `weight` keeps its name."""

    base_class = nn.Embedding


# Deprecated alias: the mixin's old name, kept so pickles and code that name it still load.
EmbeddingLora = EmbeddingLoraMixin
