"""LoRA+ parameter groups: the same learning rate and weight decay per parameter as PEFT's
`create_loraplus_optimizer`, and `lorakit finetune --loraplus-ratio` training with them."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

import lorakit
from lorakit.errors import ConfigError
from lorakit.optim import param_groups

CASES = {  # model, LoRA targets, modules trained in full, bias mode
    "gpt2-embedding-layernorm-bias": (tiny_gpt2, ["c_attn", "wte"], ["ln_f"], "all"),
    "llama-head": (tiny_llama, ["q_proj", "v_proj", "embed_tokens"], ["lm_head"], "none"),
}


def _canonical(name: str) -> str:
    """One name for a parameter in PEFT's model and lorakit's: module path + A/B or field."""
    name = name.removeprefix("base_model.model.").replace("modules_to_save.default.", "")
    name = name.replace("base_layer.", "")
    peft = re.fullmatch(r"(.*)\.lora(?:_embedding)?_([AB])\.default(?:\.weight)?", name)
    ours = re.fullmatch(r"(.*)\.lora\.default\.lora_([AB])", name)
    found = peft or ours
    return f"{found[1]}:{found[2]}" if found else name


def _rates(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, tuple]:
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {
        _canonical(n): (group_of[id(p)]["lr"], group_of[id(p)]["weight_decay"])
        for n, p in model.named_parameters()
        if p.requires_grad
    }


@pytest.mark.parametrize("case", CASES)
def test_groups_match_peft_create_loraplus_optimizer(case: str) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    make, targets, full, bias = CASES[case]
    config = LoraConfig(r=4, target_modules=targets, modules_to_save=full, bias=bias)
    peft_model = get_peft_model(make(), config)
    peft_opt = create_loraplus_optimizer(
        peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
        loraplus_weight_decay=0.1, loraplus_lr_embedding=1e-6,
    )  # fmt: skip
    ours = make()
    config = lorakit.LoraConfig(rank=4, targets=targets, modules_to_save=full, bias=bias)
    lorakit.inject(ours, config)
    groups = param_groups(ours, 1e-3, loraplus_ratio=16, weight_decay=0.1, embedding_lr=1e-6)
    want, got = _rates(peft_model, peft_opt), _rates(ours, torch.optim.AdamW(groups))
    assert got == want
    assert {lr for lr, _ in got.values()} == {1e-3, 16e-3, 1e-6}  # every group is exercised


def test_ratio_one_trains_exactly_like_one_adamw_group() -> None:
    def trained(make_optimizer) -> list[torch.Tensor]:
        model = tiny_llama()
        lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="all-linear"))
        optimizer = make_optimizer(model)
        ids = torch.arange(12).reshape(2, 6)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]

    plain = trained(lambda m: torch.optim.AdamW(
        [p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05))  # fmt: skip
    grouped = trained(lambda m: torch.optim.AdamW(param_groups(m, 1e-2, weight_decay=0.05)))
    assert all(torch.equal(a, b) for a, b in zip(plain, grouped))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "lr must be a finite number >= 0, got -1.0"),
        ({"lr": 1e-3, "loraplus_ratio": float("nan")}, "loraplus_ratio must be"),
        ({"lr": 1e-3, "weight_decay": "0.1"}, "weight_decay must be"),
        ({"lr": 1e-3, "embedding_lr": float("inf")}, "embedding_lr must be"),
    ],
)
def test_bad_rates_are_named(kwargs: dict, message: str) -> None:
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=["q_proj"]))
    with pytest.raises(ConfigError, match=re.escape(message)):
        param_groups(model, **kwargs)


def test_a_model_with_nothing_to_train_is_refused() -> None:
    model = tiny_llama().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        param_groups(model, 1e-3)


def test_finetune_trains_b_faster_with_loraplus(tmp_path) -> None:
    """--loraplus-ratio reaches the optimizer: B's group runs at ratio x lr."""
    from tiny_hf import tiny_model

    from lorakit.train import TrainOptions, finetune

    folder = tiny_model(tmp_path / "model", "llama-causal")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"text": "word {i} and word {i + 1}"}}\n' for i in range(16)))
    seen = {}
    real_adamw = torch.optim.AdamW

    def spy(groups, **kwargs):
        seen["lrs"] = sorted(g["lr"] for g in groups)
        return real_adamw(groups, **kwargs)

    options = TrainOptions(model=str(folder), data=str(data), task="causal-lm", max_steps=2,
                           out=str(tmp_path / "out"), loraplus_ratio=8.0, lr=1e-3,
                           eval_fraction=0.25, progress="none")  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim, "AdamW", spy)
        finetune(options, lorakit.LoraConfig(rank=2, targets=["q_proj"]))
    assert seen["lrs"] == [1e-3, 8e-3]
