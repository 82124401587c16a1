"""Packing: a micro-batch's examples in few rows, each attending only to itself; the loss and
every adapter gradient equal the unpacked batch's, on tiny Llama and GPT-2."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import randomise_lora, tiny_gpt2, tiny_llama
from tiny_hf import completion_records, sentiment_records, tiny_model, write_jsonl

import lorakit
from lorakit.errors import ConfigError
from lorakit.train import TrainOptions, finetune
from lorakit.train.batching import collate
from lorakit.train.labelled_loss import labelled_logits_only
from lorakit.train.packing import REAL_TOKENS, model_inputs, pack, pack_rows

PAD = 0


@pytest.mark.parametrize(
    ("lengths", "capacity", "rows"),
    [
        ([5, 3, 2], 10, [[0, 1, 2]]),
        ([5, 6, 4], 10, [[1, 2], [0]]),
        ([9, 1, 8, 2], 10, [[0, 1], [2, 3]]),
        ([12, 3], 10, [[0], [1]]),  # longer than a row: a row of its own
        ([4], 4, [[0]]),
    ],
)
def test_rows_are_filled_first_fit_longest_first(lengths, capacity, rows) -> None:
    assert pack_rows(lengths, capacity) == rows


def _examples(n: int, vocab: int = 100, seed: int = 0) -> list[dict[str, list[int]]]:
    """Prompt + completion examples of 3 to 14 tokens; prompt labels are -100."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(1, vocab) for _ in range(rng.randint(3, 14))]
        prompt = rng.randint(1, len(ids) - 1)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_a_packed_row_restarts_positions_and_masks_each_first_label() -> None:
    a = {"input_ids": [11, 12, 13], "labels": [11, 12, 13]}
    b = {"input_ids": [21, 22], "labels": [-100, 22]}
    batch = pack([a, b], PAD, max_length=6)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert int(batch[REAL_TOKENS]) == 5


def test_rows_are_padded_to_the_longest_or_to_pad_to() -> None:
    a, b = ({"input_ids": [1] * n, "labels": [1] * n} for n in (4, 2))
    batch = pack([a, b], PAD, max_length=5)
    assert batch["input_ids"].tolist() == [[1, 1, 1, 1], [1, 1, PAD, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]
    assert batch["labels"][1, 2:].tolist() == [-100, -100]
    wide = pack([a, b], PAD, max_length=5, pad_to=7)
    assert wide["input_ids"].shape == (2, 7) and int(wide[REAL_TOKENS]) == 6


def test_model_inputs_drop_the_count_and_turn_the_cache_off() -> None:
    packed, real = model_inputs(pack(_examples(4), PAD, 32), "cpu")
    assert REAL_TOKENS not in packed and packed["use_cache"] is False
    assert real == sum(len(ex["input_ids"]) for ex in _examples(4))
    plain, real_plain = model_inputs(collate(_examples(4), PAD), "cpu")
    assert "use_cache" not in plain and real_plain == real


def _adapted(make, attention: str) -> torch.nn.Module:
    model = make()
    model.set_attn_implementation(attention)
    lorakit.inject(model, lorakit.LoraConfig(targets="all-linear", rank=4))
    randomise_lora(model)
    return model.train()


def _loss_and_grads(model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("labelled_only", [True, False], ids=["labelled-logits", "full-logits"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(MODELS))
def test_the_packed_loss_and_gradients_equal_the_unpacked(name, attention, labelled_only) -> None:
    model, examples = _adapted(MODELS[name], attention), _examples(9)
    plain, _ = model_inputs(collate(examples, PAD), "cpu")
    packed, _ = model_inputs(pack(examples, PAD, max_length=32), "cpu")
    assert packed["input_ids"].shape[0] < len(examples)  # several examples share a row
    with labelled_logits_only(model) if labelled_only else torch.enable_grad():
        loss, grads = _loss_and_grads(model, plain)
        packed_loss, packed_grads = _loss_and_grads(model, packed)
    torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == packed_grads.keys() and any("lora_A" in k for k in grads)
    for key, grad in grads.items():
        torch.testing.assert_close(packed_grads[key], grad, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_an_example_does_not_see_the_one_packed_before_it(attention: str) -> None:
    model = _adapted(tiny_llama, attention).eval()
    b = {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
        for first in ([31, 32, 33, 34, 35, 36], [61, 62, 63, 64, 65, 66]):  # packed before b
            a = {"input_ids": first, "labels": first}
            inputs = model_inputs(pack([a, b], PAD, 64), "cpu")[0]
            assert inputs["input_ids"][0, 6:].tolist() == b["input_ids"]
            torch.testing.assert_close(model(**inputs).logits[0, 6:], alone, atol=1e-5, rtol=1e-5)


def _options(tmp_path: Path, model: Path, data: Path, **kw) -> TrainOptions:
    base = dict(model=str(model), data=str(data), out=str(tmp_path / "out"), batch_size=8,
                lr=1e-2, warmup_steps=2, eval_every=0, save_every=0, threads=1,
                progress="none")  # fmt: skip
    return TrainOptions(**{**base, **kw})


def test_packed_finetuning_learns_from_the_same_tokens(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "llama", "llama-causal")
    data = write_jsonl(tmp_path / "train.jsonl", completion_records(64))
    runs = {
        kind: finetune(_options(tmp_path / kind, model, data, epochs=2, batching=kind))
        for kind in ("by-length", "packed")
    }
    packed, unpacked = runs["packed"].train, runs["by-length"].train
    assert packed.tokens == unpacked.tokens  # the same examples, step by step
    assert packed.eval_after["loss"] < packed.eval_before["loss"]
    assert packed.eval_after["loss"] == pytest.approx(unpacked.eval_after["loss"], rel=1e-4)


def test_packing_a_classifier_is_refused(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "bert")
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(16))
    with pytest.raises(ConfigError, match=r"batching='packed' needs task causal-lm, got 'seq-cls'"):
        finetune(_options(tmp_path, model, data, batching="packed"))
