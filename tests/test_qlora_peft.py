"""Adapters on a bitsandbytes-quantized Llama exchanged with the real `peft`, both directions.

The base is loaded the way users do it (transformers + BitsAndBytesConfig, on the CPU); PEFT's
own LoRA over it and lorakit's, with the same adapter weights, give the same outputs.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import qlora_models
import torch
from conftest import randomise_lora
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lorakit

ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANTIZATION = {
    "nf4-double-bf16": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qlora_models.llama_folder(tmp_path_factory.mktemp("llama"))


def quantized(folder: Path, kind: str) -> nn.Module:
    config = BitsAndBytesConfig(**QUANTIZATION[kind])
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu"
    ).eval()


def run(model: nn.Module) -> torch.Tensor:
    """Logits in train mode (the Llama has no dropout): bitsandbytes repacks 4-bit codes for
    CPU inference in eval mode, which lorakit's adapted layers never do (its kernel has no
    backward), so eval outputs differ from PEFT's by that kernel's bfloat16 rounding."""
    tokens = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.train()(tokens).logits


def nudge_adapters(model: nn.Module, seed: int) -> None:
    """What training would do: every adapter factor random, so nothing matches by luck."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("kind", QUANTIZATION)
def test_peft_qlora_adapter_loads_in_lorakit(kind: str, llama_folder: Path, tmp_path: Path):
    base = quantized(llama_folder, kind)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    peft_model = peft.get_peft_model(base, config).eval()
    nudge_adapters(peft_model, seed=5)
    peft_model.save_pretrained(tmp_path)

    model = quantized(llama_folder, kind)
    assert not torch.allclose(run(model), run(peft_model), atol=1e-3)  # the adapter matters
    lorakit.load_adapter(model, tmp_path)
    torch.testing.assert_close(run(model), run(peft_model), rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", QUANTIZATION)
def test_lorakit_qlora_adapter_loads_in_peft(kind: str, llama_folder: Path, tmp_path: Path):
    model = quantized(llama_folder, kind)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    randomise_lora(model)
    lorakit.save_adapter(model, tmp_path)

    peft_model = peft.PeftModel.from_pretrained(quantized(llama_folder, kind), tmp_path).eval()
    peft_layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(peft_layer).__module__ == "peft.tuners.lora.bnb"  # PEFT's own QLoRA layer
    torch.testing.assert_close(run(peft_model), run(model), rtol=0, atol=ATOL)


def test_qlora_adapter_loads_into_the_full_precision_model(llama_folder: Path, tmp_path: Path):
    model = quantized(llama_folder, "nf4-double-bf16")
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    randomise_lora(model)
    lorakit.save_adapter(model, tmp_path)

    full = AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    lorakit.load_adapter(full, tmp_path)
    peft_full = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama_folder), tmp_path
    ).eval()
    torch.testing.assert_close(run(full), run(peft_full), rtol=0, atol=ATOL)
    q_state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    full_state = {k: v for k, v in full.state_dict().items() if "lora_" in k}
    assert q_state.keys() == full_state.keys()
