"""`trainable_token_indices` against the real `peft` package: files both ways (same keys,
same config field, same logits), and the same merge; tied and untied lm_head, list and dict
forms, LoRA elsewhere trained or left as initialised (PEFT's LoraConfig always needs some LoRA
target, so "tokens only" is the case where only the rows moved)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from peft_cross import assert_same_merge, model_output, nudge_trainable
from safetensors import safe_open
from token_models import ROWS, ids_with_rows, tiny_llama
from torch import nn

import lorakit

ATOL = 1e-5
DELTA_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


@dataclass(frozen=True)
class Case:
    id: str
    tied: bool
    indices: object  # trainable_token_indices, as both libraries take it
    targets: tuple[str, ...] = ("q_proj",)
    lora_trained: bool = True  # False: only the rows move (LoRA stays a no-op)


CASES = [
    Case("list-untied", False, list(ROWS)),
    Case("list-tied", True, list(ROWS), targets=("q_proj", "v_proj")),
    Case("dict-untied", False, {"embed_tokens": [5, 42]}),
    Case("dict-tied", True, {"model.embed_tokens": list(ROWS)}),
    Case("rows-only-untied", False, list(ROWS), lora_trained=False),
    Case("rows-only-tied", True, {"embed_tokens": [0, 99]}, lora_trained=False),
]
CASE = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def _move(model: nn.Module, case: Case, seed: int) -> None:
    """Train-like changes: every trainable tensor, or only the token rows."""
    if case.lora_trained:
        nudge_trainable(model, seed)
        return
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name or name.endswith(".delta"):
                p.add_(torch.randn(p.shape, generator=generator))


def _peft_model(case: Case) -> nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(case.targets),
                             trainable_token_indices=case.indices)  # fmt: skip
    model = peft.get_peft_model(tiny_llama(case.tied), config)
    _move(model, case, seed=11)
    return model


def _lorakit_model(case: Case) -> nn.Module:
    model = tiny_llama(case.tied)
    config = lorakit.LoraConfig(rank=4, alpha=8, targets=case.targets,
                                trainable_token_indices=case.indices)  # fmt: skip
    lorakit.inject(model, config)
    _move(model, case, seed=12)
    return model


def _keys(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model, ids_with_rows())


@CASE
def test_files_have_peft_keys_and_config(case: Case, tmp_path: Path) -> None:
    _peft_model(case).save_pretrained(tmp_path / "peft")
    lorakit.save_adapter(_lorakit_model(case), tmp_path / "ours")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "peft")
    assert DELTA_KEY in _keys(tmp_path / "ours")  # a tied lm_head saves nothing of its own
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text())
               for d in ("peft", "ours")]  # fmt: skip
    assert configs[0]["trainable_token_indices"] == configs[1]["trainable_token_indices"]


@CASE
def test_peft_saves_lorakit_loads(case: Case, tmp_path: Path) -> None:
    ref = _peft_model(case)
    ref.save_pretrained(tmp_path)
    model = lorakit.load_adapter(tiny_llama(case.tied), tmp_path)
    torch.testing.assert_close(_outputs(model), _outputs(ref), rtol=0, atol=ATOL)
    assert not torch.allclose(_outputs(model), _outputs(tiny_llama(case.tied)), atol=1e-3)
    assert_same_merge(ref, model, ids_with_rows(), atol=ATOL)


@CASE
def test_lorakit_saves_peft_loads(case: Case, tmp_path: Path) -> None:
    model = _lorakit_model(case)
    lorakit.save_adapter(model, tmp_path)
    ref = peft.PeftModel.from_pretrained(tiny_llama(case.tied), tmp_path)
    torch.testing.assert_close(_outputs(ref), _outputs(model), rtol=0, atol=ATOL)
    assert_same_merge(ref, model, ids_with_rows(), atol=ATOL)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gradients_match_peft(tied: bool, tmp_path: Path) -> None:
    """One backward pass: the same gradient on the rows (through lm_head too when tied)."""
    case = Case("grad", tied, list(ROWS), lora_trained=False)
    ref = _peft_model(case)
    ref.save_pretrained(tmp_path)
    model = lorakit.load_adapter(tiny_llama(tied), tmp_path)
    ref_rows = ref.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta
    rows = [ref_rows["default"], model.model.embed_tokens.lora["default"].delta]
    for m in (ref, model):
        model_output(m, ids_with_rows()).square().mean().backward()
    torch.testing.assert_close(rows[1].grad, rows[0].grad, rtol=0, atol=1e-6)


class ScaledEmbedding(nn.Embedding):
    """Gemma's kind of embedding: the base forward scales its output by `embed_scale`."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__(vocab, dim)
        self.embed_scale = 3.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


class ScaledNet(nn.Module):
    """No `get_input_embeddings`: both libraries fall back to the module named embed_tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = ScaledEmbedding(50, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed_tokens(ids))


def test_a_scaled_embedding_keeps_its_scale_like_peft(tmp_path: Path) -> None:
    ids = torch.tensor([[1, 4, 9, 4, 30]])
    ref = peft.get_peft_model(
        ScaledNet(), peft.LoraConfig(target_modules=["head"], trainable_token_indices=[4, 9])
    )
    nudge_trainable(ref, seed=3)
    ref.save_pretrained(tmp_path)
    model = lorakit.load_adapter(ScaledNet(), tmp_path)
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=ATOL)
    rows = model.embed_tokens.lora["default"].delta
    torch.testing.assert_close(model.embed_tokens(ids)[0, 1], rows[0] * 3.0)
    assert_same_merge(ref, model, ids, atol=ATOL)
