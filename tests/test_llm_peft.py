"""A lorakit adapter on the real SmolLM2 loads in PEFT with the same logits, and `lorakit merge`
of it gives a plain model folder that transformers generates with, token for token as lorakit.

SmolLM2 is loaded once for the module; PEFT adapts a copy of it, not a second load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import randomise_lora
from torch import nn

import lorakit
from lorakit.cli import main
from lorakit.llm.model import load_causal_lm, smollm2_folder
from lorakit.merge import disabled

# A prompt whose greedy answer the adapter below changes ("The color I'm referring to..."
# -> "The most obvious color...": it is not one the base answers with near certainty).
CHAT = [{"role": "user", "content": "Name a color."}]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def adapted(smollm2_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """(base copy, lorakit-adapted model, tokenizer, adapter folder, chat prompt ids)."""
    model, tokenizer = load_causal_lm(smollm2_folder(smollm2_cache))
    base = copy.deepcopy(model)  # for PEFT: a second base without a second load
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    # A and B random, B nonzero: the adapter changes the answer. Larger factors push the
    # logits' float32 rounding (lorakit vs PEFT, 30 layers) towards the 1e-4 bound.
    randomise_lora(model, std=0.05)
    adapter = lorakit.save_adapter(model, tmp_path_factory.mktemp("smollm2-adapter"))
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    return base, model.eval(), tokenizer, adapter, ids


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _greedy(model: nn.Module, ids: torch.Tensor, pad: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, pad_token_id=pad)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def test_peft_loads_the_lorakit_adapter_with_the_same_logits(adapted) -> None:
    import peft

    base, model, _, adapter, ids = adapted
    want = _logits(model, ids)
    with disabled(model):
        assert (want - _logits(model, ids)).abs().max() > 0.1  # the adapter matters
    peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert type(peft_model).__name__ == "PeftModelForCausalLM"  # from the stored task_type
    assert (_logits(peft_model, ids) - want).abs().max() <= 1e-4


def test_merged_folder_generates_as_lorakit(adapted, smollm2_cache: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    _, model, tokenizer, adapter, ids = adapted
    out = tmp_path / "merged"
    # no --base: the adapter records the model folder it was saved from
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    want = _greedy(model, ids, pad)
    assert _greedy(merged, ids, pad) == want
    with disabled(model):
        assert _greedy(model, ids, pad) != want  # the merged weights carry the adapter
    assert (out / "tokenizer.json").is_file()  # the base's side files come along
