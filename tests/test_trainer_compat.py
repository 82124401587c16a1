"""A lorakit-adapted transformers model trains under `transformers.Trainer` and `accelerate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_hf import llama_config
from transformers import LlamaForCausalLM

import lorakit


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(128))


def _examples(n: int = 16, length: int = 12) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 128, (n, length), generator=g).tolist()
    return [{"input_ids": r, "attention_mask": [1] * length, "labels": r} for r in rows]


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_trains_only_the_adapter_and_saves_it(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = _tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = _trainable(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=_examples(), data_collator=default_data_collator
    )
    result = trainer.train()
    assert result.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    after = _trainable(model)
    assert before.keys() == after.keys() and all(".lora." in k for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in after if k.endswith("lora_B"))
    for name, p in model.named_parameters():  # the base stayed exactly as it was
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name

    folder = lorakit.save_adapter(model, tmp_path / "adapter")
    fresh = _tiny_llama()
    lorakit.load_adapter(fresh, folder)
    ids = torch.tensor([_examples(1)[0]["input_ids"]])
    model.eval()
    torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def test_accelerate_prepare_and_step() -> None:
    accelerate = pytest.importorskip("accelerate")

    model = _tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(params, lr=1e-2))
    batch = {k: torch.tensor([v]) for k, v in _examples(1)[0].items()}
    first = None
    for _ in range(5):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        first = first if first is not None else loss.item()
    assert model(**batch).loss.item() < first  # it learns the one example
