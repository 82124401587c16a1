"""Shared fixtures: tiny layers and tiny transformers models with random weights (no downloads).

Builders are plain functions so tests can parametrise over them; every builder seeds torch,
so two calls give identical weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, settings
from tiny_hf import bert_config, llama_config
from torch import nn
from transformers import (
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

VOCAB = 100
HIDDEN = 32
SEED = 0

# Property tests (tests/test_properties.py): "ci" is the default, a few derandomized examples
# per property so runs are reproducible and quick on a busy box; HYPOTHESIS_PROFILE=long
# searches much harder (random seeds, many examples) when hunting bugs.
settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=400,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the tree; print_blob replays a failure
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# -- single layers ------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCase:
    """A layer builder, an input builder, and the module type it must come back as."""

    id: str
    make: Callable[[], nn.Module]
    make_input: Callable[[], torch.Tensor]
    base_type: type[nn.Module]


def _ids() -> torch.Tensor:
    torch.manual_seed(SEED + 1)
    ids = torch.randint(0, 20, (2, 5))
    ids[0, 0] = 0  # hits padding_idx where there is one
    return ids


def _randn(*shape: int) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        torch.manual_seed(SEED + 1)
        return torch.randn(*shape)

    return make


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(SEED)
        return factory()

    return make


def _linear(bias: bool) -> nn.Module:
    return nn.Linear(6, 5, bias=bias)


def _conv1d_gpt2() -> nn.Module:
    layer = Conv1D(5, 6)  # nf=out, nx=in; weight (in, out)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)  # Conv1D starts with a zero bias; make it count
    return layer


LAYER_CASES = [
    LayerCase("linear", _seeded(lambda: _linear(True)), _randn(3, 4, 6), nn.Linear),
    LayerCase("linear-nobias", _seeded(lambda: _linear(False)), _randn(3, 6), nn.Linear),
    LayerCase("gpt2-conv1d", _seeded(_conv1d_gpt2), _randn(2, 4, 6), Conv1D),
    LayerCase("embedding", _seeded(lambda: nn.Embedding(20, 6)), _ids, nn.Embedding),
    LayerCase(
        "embedding-padding",
        _seeded(lambda: nn.Embedding(20, 6, padding_idx=0)),
        _ids,
        nn.Embedding,
    ),
    LayerCase("conv1d", _seeded(lambda: nn.Conv1d(3, 4, 3)), _randn(2, 3, 9), nn.Conv1d),
    LayerCase(
        "conv1d-nobias",
        _seeded(lambda: nn.Conv1d(3, 4, 3, bias=False)),
        _randn(2, 3, 9),
        nn.Conv1d,
    ),
    LayerCase("conv2d", _seeded(lambda: nn.Conv2d(3, 4, 3)), _randn(2, 3, 7, 7), nn.Conv2d),
    LayerCase(
        "conv2d-strided",
        _seeded(lambda: nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, dilation=2)),
        _randn(2, 3, 9, 8),
        nn.Conv2d,
    ),
    LayerCase("conv3d", _seeded(lambda: nn.Conv3d(2, 3, 2)), _randn(1, 2, 4, 4, 4), nn.Conv3d),
]


@pytest.fixture(params=LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def layer_case(request: pytest.FixtureRequest) -> LayerCase:
    return request.param


# -- tiny models ----------------------------------------------------------------------------
class MLP(nn.Module):
    """A two-layer perceptron with a head: in 8 -> 16 -> 16 -> 4."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny_mlp() -> nn.Module:
    torch.manual_seed(SEED)
    return MLP().eval()


def tiny_llama() -> nn.Module:
    torch.manual_seed(SEED)
    return LlamaForCausalLM(llama_config(VOCAB)).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert() -> nn.Module:
    torch.manual_seed(SEED)
    return BertForSequenceClassification(bert_config(VOCAB, num_labels=3)).eval()


@dataclass(frozen=True)
class ModelCase:
    """A tiny model builder, its input, and the modules a test can target on it."""

    id: str
    make: Callable[[], nn.Module]
    make_input: Callable[[], torch.Tensor]
    targets: tuple[str, ...]

    def run(self, model: nn.Module) -> torch.Tensor:
        """The model's main output as one tensor (logits for transformers models)."""
        out = model(self.make_input())
        return out if isinstance(out, torch.Tensor) else out.logits


def _tokens() -> torch.Tensor:
    torch.manual_seed(SEED + 1)
    return torch.randint(0, VOCAB, (2, 7))


MODEL_CASES = [
    ModelCase("mlp", tiny_mlp, _randn(3, 8), ("fc1", "fc2")),
    ModelCase("llama", tiny_llama, _tokens, ("q_proj", "v_proj")),
    ModelCase("gpt2", tiny_gpt2, _tokens, ("c_attn", "c_proj")),
    ModelCase("bert", tiny_bert, _tokens, ("query", "value")),
]


@pytest.fixture(params=MODEL_CASES, ids=[c.id for c in MODEL_CASES])
def model_case(request: pytest.FixtureRequest) -> ModelCase:
    return request.param


def randomise_lora(model: nn.Module, std: float = 0.1, seed: int = 123) -> None:
    """Give every adapter a non-zero delta (both A and B random), so outputs differ from base."""
    from lorakit.layers import LoRA

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRA):
                for p in (module.lora_A, module.lora_B):
                    p.copy_(torch.randn(p.shape, generator=generator) * std)


# -- decoder LLMs (tests/llm_fixtures.py) -------------------------------------------------------
from llm_fixtures import smollm2_cache, tiny_chat_folder  # noqa: E402, F401
