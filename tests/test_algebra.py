"""`lorakit.combine`: the numbers of PEFT's add_weighted_adapter, and its bad input refused."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
from conftest import VOCAB, randomise_lora, tiny_gpt2, tiny_llama, tiny_mlp
from torch import nn

import lorakit

ATOL = 1e-5
A_CONFIG = {"rank": 4, "alpha": 8.0, "targets": ("q_proj", "v_proj")}
SAME_TARGETS_R2 = {"rank": 2, "alpha": 6.0, "targets": ("q_proj", "v_proj")}
OTHER_TARGETS_R4 = {"rank": 4, "alpha": 16.0, "targets": ("q_proj", "k_proj")}
OTHER_TARGETS_R2 = {"rank": 2, "alpha": 3.0, "targets": ("k_proj", "v_proj"), "use_rslora": True}


@dataclass(frozen=True)
class Case:
    id: str
    b_config: dict
    method: str
    weights: tuple[float, float]
    rank: int | None = None
    make: Callable[[], nn.Module] = tiny_llama
    a_config: dict = field(default_factory=lambda: A_CONFIG)


EMBEDDING = {"rank": 3, "alpha": 5.0, "targets": ("embed_tokens", "q_proj")}
GPT2 = {"rank": 2, "alpha": 4.0, "targets": ("c_attn", "c_proj")}  # Conv1D: W is (in, out)


CASES = [
    Case("cat", SAME_TARGETS_R2, "cat", (1.0, 0.5)),
    Case("cat-negative-other-targets", OTHER_TARGETS_R2, "cat", (0.8, -1.5)),
    Case("linear", {**A_CONFIG, "alpha": 12.0}, "linear", (0.7, 0.3)),
    Case("linear-negative-other-targets", OTHER_TARGETS_R4, "linear", (-0.7, 1.3)),
    Case("svd-default-rank", SAME_TARGETS_R2, "svd", (1.0, -0.5)),
    Case("svd-rank-3", SAME_TARGETS_R2, "svd", (-2.0, 1.0), rank=3),
    Case("svd-other-targets", OTHER_TARGETS_R2, "svd", (0.5, 2.0), rank=5),
    Case("cat-embedding", EMBEDDING, "cat", (1.0, -0.5), a_config={**EMBEDDING, "rank": 2}),
    Case("svd-embedding", EMBEDDING, "svd", (1.0, -0.5), rank=3, a_config={**EMBEDDING, "rank": 2}),
    Case("linear-embedding", EMBEDDING, "linear", (0.5, 0.5), a_config={**EMBEDDING, "alpha": 2}),
    Case("svd-gpt2-conv1d", GPT2, "svd", (-1.0, 2.0), rank=3, make=tiny_gpt2,
         a_config={**GPT2, "rank": 4}),
    Case("cat-gpt2-conv1d", GPT2, "cat", (0.3, 0.9), make=tiny_gpt2, a_config={**GPT2, "rank": 4}),
]


def _tokens() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 7))


def _run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_tokens()).logits


def _two_adapters(
    b_config: dict, make: Callable[[], nn.Module] = tiny_llama, a_config: dict = A_CONFIG
) -> nn.Module:
    model = make()
    lorakit.inject(model, lorakit.LoraConfig(**a_config), "a")
    lorakit.inject(model, lorakit.LoraConfig(**b_config), "b")
    randomise_lora(model)
    return model


def _in_peft(model: nn.Module, tmp_path: Path, make: Callable[[], nn.Module]) -> peft.PeftModel:
    """The same two adapters in real PEFT, through lorakit's PEFT-format files."""
    folders = {n: lorakit.save_adapter(model, tmp_path, adapter_name=n) for n in ("a", "b")}
    peft_model = peft.PeftModel.from_pretrained(make(), folders["a"], adapter_name="a")
    peft_model.load_adapter(folders["b"], adapter_name="b")
    return peft_model.eval()


def _peft_deltas(peft_model: peft.PeftModel, name: str) -> dict[str, torch.Tensor]:
    inner = peft_model.base_model.model
    return {path: m.get_delta_weight(name) for path, m in inner.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)
            and (name in m.lora_A or name in m.lora_embedding_A)}  # fmt: skip


def _lorakit_deltas(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {path: layer.delta_weight(name).detach() for path, layer in lorakit.lora_layers(model)
            if name in layer.lora}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_combine_matches_peft(case: Case, tmp_path: Path) -> None:
    model = _two_adapters(case.b_config, case.make, case.a_config)
    peft_model = _in_peft(model, tmp_path, case.make)
    peft_model.add_weighted_adapter(
        ["a", "b"], list(case.weights), "c", combination_type=case.method, svd_rank=case.rank
    )
    lorakit.combine(model, ["a", "b"], case.weights, method=case.method, new_name="c",
                    rank=case.rank)  # fmt: skip

    ours, theirs = _lorakit_deltas(model, "c"), _peft_deltas(peft_model, "c")
    assert set(ours) == set(theirs)
    for path in ours:
        torch.testing.assert_close(ours[path], theirs[path], rtol=0, atol=ATOL, msg=path)
    peft_model.set_adapter("c")
    lorakit.set_active(model, "c")
    assert not torch.allclose(_run(model), _run(case.make()), atol=1e-3)  # "c" matters
    torch.testing.assert_close(_run(model), _run(peft_model), rtol=0, atol=ATOL)


def test_combined_adapter_saves_and_loads_in_peft_and_lorakit(tmp_path: Path) -> None:
    """Per-layer ranks differ (rank_pattern with exact paths): both libraries reload them."""
    model = _two_adapters(OTHER_TARGETS_R2)
    ranks = lorakit.combine(model, ["a", "b"], [1.0, -1.0], method="cat", new_name="c")
    assert sorted(set(ranks.values())) == [2, 4, 6]  # k: b only, q: a only, v: both
    lorakit.set_active(model, "c")
    folder = lorakit.save_adapter(model, tmp_path, adapter_name="c")

    again = peft.PeftModel.from_pretrained(tiny_llama(), folder).eval()
    torch.testing.assert_close(_run(again), _run(model), rtol=0, atol=ATOL)
    ours = lorakit.from_pretrained(tiny_llama(), folder)
    torch.testing.assert_close(_run(ours), _run(model), rtol=0, atol=ATOL)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.25, -3.0), (-1.0, 0.0)])
def test_cat_is_exactly_the_weighted_sum(weights: tuple[float, float]) -> None:
    model = tiny_mlp()
    for name, rank in (("a", 3), ("b", 5)):
        config = lorakit.LoraConfig(rank=rank, alpha=2.0 * rank + 1, dtype=torch.float64,
                                    targets=("fc1", "fc2"))  # fmt: skip
        lorakit.inject(model, config, name)
    randomise_lora(model)
    lorakit.combine(model, ["a", "b"], weights, method="cat", new_name="c")
    for _, layer in lorakit.lora_layers(model):
        expected = weights[0] * layer.delta_weight("a") + weights[1] * layer.delta_weight("b")
        assert layer.lora["c"].rank == 8
        torch.testing.assert_close(layer.delta_weight("c"), expected, rtol=0, atol=1e-14)


def test_new_adapter_is_inactive_and_frozen() -> None:
    model = _two_adapters(SAME_TARGETS_R2)
    before = _run(model)
    lorakit.combine(model, ["a", "b"], [1.0, 1.0], method="svd", new_name="mix")
    assert lorakit.adapter_names(model) == ("a", "b", "mix")
    assert lorakit.active_adapters(model) == ("b",)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)
    torch.testing.assert_close(_run(model), before, rtol=0, atol=0)


def test_svd_of_exact_rank_is_exact() -> None:
    model = _two_adapters(SAME_TARGETS_R2)
    lorakit.combine(model, ["a", "b"], [1.0, -2.0], method="cat", new_name="cat")
    lorakit.combine(model, ["a", "b"], [1.0, -2.0], method="svd", new_name="svd", rank=6)
    for _, layer in lorakit.lora_layers(model):
        assert layer.lora["svd"].rank == 6
        torch.testing.assert_close(layer.delta_weight("svd"), layer.delta_weight("cat"),
                                   rtol=0, atol=1e-6)  # fmt: skip


ERRORS = [
    ("unknown-name", {"names": ["a", "zz"]}, lorakit.AdapterError, r"unknown adapter.*'zz'"),
    ("repeated-name", {"names": ["a", "a"], "weights": [1, 2]}, lorakit.AdapterError,
     r"names lists adapter\(s\) \['a'\] more than once"),
    ("empty-names", {"names": [], "weights": []}, lorakit.AdapterError, "names must be"),
    ("names-str", {"names": "a"}, lorakit.AdapterError, "names must be .* got 'a'"),
    ("new-name-taken", {"new_name": "b"}, lorakit.AdapterError, "new_name 'b' is already"),
    ("new-name-bad", {"new_name": "x.y"}, lorakit.AdapterError, "new_name .* got 'x.y'"),
    ("weights-length", {"weights": [1.0]}, lorakit.ConfigError, "weights has 1 values for 2"),
    ("weights-nan", {"weights": [1.0, float("nan")]}, lorakit.ConfigError, "finite.* got nan"),
    ("weights-str", {"weights": [1.0, "2"]}, lorakit.ConfigError, "finite numbers, got '2'"),
    ("method", {"method": "ties"}, lorakit.ConfigError, r"method must be one of .* got 'ties'"),
    ("linear-ranks", {"method": "linear"}, lorakit.ConfigError,
     r"method='linear' needs adapters of one rank.*\{'a': 4, 'b': 2\}"),
    ("rank-zero", {"method": "svd", "rank": 0}, lorakit.ConfigError, "rank must be .* got 0"),
    ("rank-above-size", {"method": "svd", "rank": 33}, lorakit.ConfigError,
     r"rank=33 is above the size of layer .*q_proj.*32 x 32, so rank <= 32"),
    ("rank-with-cat", {"method": "cat", "rank": 2}, lorakit.ConfigError,
     "rank applies to method='svd' only, got rank=2"),
]  # fmt: skip


@pytest.mark.parametrize(
    "change, error, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_bad_input_is_refused_and_model_unchanged(change: dict, error: type, match: str) -> None:
    model = _two_adapters(SAME_TARGETS_R2)
    args = {"names": ["a", "b"], "weights": [1.0, 1.0], "method": "cat", "new_name": "c"}
    with pytest.raises(error, match=match):
        lorakit.combine(model, **{**args, **change})
    assert lorakit.adapter_names(model) == ("a", "b")
    assert all(set(layer.lora) <= {"a", "b"} for _, layer in lorakit.lora_layers(model))


def test_dora_adapter_is_refused() -> None:
    model = tiny_mlp()
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("fc1",)), "a")
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("fc1",), use_dora=True), "d")
    with pytest.raises(lorakit.ConfigError, match=r"adapter 'd' is DoRA \(use_dora=True\)"):
        lorakit.combine(model, ["a", "d"], [1.0, 1.0], new_name="c")
