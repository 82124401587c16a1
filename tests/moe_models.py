"""Tiny models with raw-parameter weights for `target_parameters` tests: transformers v5
mixture-of-experts models (experts fused as 3-D parameters) and a small custom module."""

from __future__ import annotations

import torch
from torch import Tensor, nn

MOE_VOCAB = 64


def tiny_mixtral() -> nn.Module:
    """Mixtral: experts (E, out, in): gate_up_proj (4, 2 * 24, 16), down_proj (4, 16, 24)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=MOE_VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    return MixtralForCausalLM(config).eval()


def tiny_gpt_oss() -> nn.Module:
    """gpt-oss: experts stored transposed (E, in, out), `is_transposed = True`, with biases."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=MOE_VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32, sliding_window=8,
        layer_types=["full_attention"], tie_word_embeddings=False,
    )  # fmt: skip
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():  # its init leaves the expert biases and stacks at zero / tiny
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.copy_(torch.randn(p.shape) * 0.2)
    return model


class RawBlock(nn.Module):
    """A 2-D (out, in) matrix and a 3-D (E, out, in) stack used by hand, plus a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(10, 12) * 0.3)
        self.bias = nn.Parameter(torch.randn(10) * 0.1)
        self.stack = nn.Parameter(torch.randn(3, 8, 10) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(x @ self.proj.t() + self.bias)
        return torch.einsum("...i,eoi->...o", h, self.stack)


class RawNet(nn.Module):
    """`block` holds the raw parameters (PEFT cannot adapt a top-level module's)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = RawBlock()
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(x))


def moe_tokens() -> Tensor:
    return torch.randint(0, MOE_VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def raw_features() -> Tensor:
    return torch.randn(3, 4, 12, generator=torch.Generator().manual_seed(1))
