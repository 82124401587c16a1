"""Tiny bitsandbytes-quantized models for the QLoRA tests: one builder per quantization kind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import bitsandbytes as bnb
import torch
from torch import nn

IN, HIDDEN, OUT = 64, 128, 64  # multiples of bitsandbytes' 4-bit block (64)

# kind -> Linear4bit options (int8: Linear8bitLt with int8 weights)
KINDS: dict[str, dict] = {
    "nf4": dict(quant_type="nf4", compress_statistics=False, compute_dtype=torch.float32),
    "nf4-double": dict(quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32),
    "nf4-bf16": dict(quant_type="nf4", compress_statistics=True, compute_dtype=torch.bfloat16),
    "fp4": dict(quant_type="fp4", compress_statistics=False, compute_dtype=torch.float32),
    "fp4-bf16": dict(quant_type="fp4", compress_statistics=True, compute_dtype=torch.bfloat16),
    "int8": {},
}


def quantized_linear(kind: str, source: nn.Linear) -> nn.Module:
    """`source` quantized as `kind`, on the CPU (bitsandbytes quantizes on the `.to`)."""
    bias = source.bias is not None
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(
            source.in_features, source.out_features, bias, has_fp16_weights=False
        )
    else:
        layer = bnb.nn.Linear4bit(source.in_features, source.out_features, bias, **KINDS[kind])
    layer.load_state_dict(source.state_dict())
    return layer.to("cpu")


def full_mlp(seed: int = 0) -> nn.Sequential:
    """The full-precision two-layer MLP the quantized ones come from."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT, bias=False))


def quantized_mlp(kind: str, seed: int = 0) -> nn.Sequential:
    """`full_mlp(seed)` with both Linears quantized as `kind`; same seed, same codes."""
    full = full_mlp(seed)
    return nn.Sequential(
        quantized_linear(kind, full[0]), nn.GELU(), quantized_linear(kind, full[2])
    )


def builders() -> dict[str, Callable[[], nn.Sequential]]:
    return {kind: (lambda k=kind: quantized_mlp(k)) for kind in KINDS}


def llama_folder(folder: Path) -> Path:
    """A tiny random Llama whose layer inputs are multiples of bitsandbytes' 4-bit block (64):
    bitsandbytes' CPU inference path (eval, no grad) cannot repack narrower 4-bit weights."""
    from tiny_hf import copy_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = copy_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def bert_folder(folder: Path) -> Path:
    """A tiny random BERT classifier with hidden size 64 (see `llama_folder`)."""
    from tiny_hf import bert_config, copy_tokenizer
    from transformers import BertForSequenceClassification

    vocab = copy_tokenizer(folder)
    config = bert_config(vocab)
    config.hidden_size, config.intermediate_size = 64, 128
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder
