"""The training loop and `lorakit.train.finetune` on tiny real transformers models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_hf import completion_records, sentiment_records, tiny_model, write_jsonl

import lorakit
from lorakit.errors import ConfigError
from lorakit.train import TrainingError, TrainOptions, WarmupDecay, finetune
from lorakit.train.report import read_metrics
from lorakit.train.state import latest_checkpoint, read_checkpoint


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("models") / "bert")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("models") / "llama", "llama-causal")


def _options(tmp_path: Path, model: Path, data: Path, **kw) -> TrainOptions:
    base = dict(
        model=str(model),
        data=str(data),
        out=str(tmp_path / "out"),
        batch_size=8,
        epochs=1,
        lr=1e-2,
        warmup_steps=2,
        eval_every=0,
        log_every=1,
        save_every=0,
        threads=1,
        progress="none",
    )
    return TrainOptions(**{**base, **kw})


def _adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_seq_cls_writes_adapter_metrics_plot_and_summary(tmp_path: Path, bert_dir: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(80))
    result = finetune(_options(tmp_path, bert_dir, data, eval_every=3))
    out = tmp_path / "out"
    assert result.task == "seq-cls"  # from architectures: BertForSequenceClassification
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "training.png").stat().st_size > 0
    records = read_metrics(out / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, result.train.steps + 1))
    evals = [r["step"] for r in records if "eval" in r]
    assert evals == [0, 3, 6, result.train.steps]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    run = json.loads((out / "run.json").read_text())
    assert run["labels"] == {"neg": 0, "pos": 1}
    for row in ("trainable params", "eval accuracy", "majority baseline", "tokens/s"):
        assert row in result.summary
    assert result.report.modules_to_save == ("classifier",)  # the head trains in full
    assert 0 < result.report.trainable < result.report.total


def test_saved_adapter_reloads_to_the_trained_model(tmp_path: Path, bert_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(48))
    result = finetune(_options(tmp_path, bert_dir, data))
    ids = torch.randint(1000, 2000, (3, 7))
    trained = result.model.eval()(input_ids=ids).logits
    fresh = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    lorakit.load_adapter(fresh, result.adapter)
    torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, trained)


def test_causal_lm_learns_the_completion(tmp_path: Path, llama_dir: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", completion_records(96))
    result = finetune(_options(tmp_path, llama_dir, data, epochs=3))
    assert result.task == "causal-lm"  # from architectures: LlamaForCausalLM
    before, after = result.train.eval_before, result.train.eval_after
    assert set(after) == {"loss", "perplexity"}
    assert after["loss"] < before["loss"]
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert result.baseline is None


def test_gradient_accumulation_equals_the_bigger_batch(tmp_path: Path) -> None:
    # float64 throughout: in float32, Adam turns rounding differences of gradients that
    # cancel to ~0 into visible update differences (lr * dg / eps).
    model = tiny_model(tmp_path / "bert64", dtype=torch.float64)
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(64))
    lora = lorakit.LoraConfig(dtype=None)
    one = finetune(_options(tmp_path / "a", model, data, batch_size=16, max_steps=3), lora)
    two = finetune(
        _options(tmp_path / "b", model, data, batch_size=8, grad_accum=2, max_steps=3), lora
    )
    a, b = _adapter_tensors(one.model), _adapter_tensors(two.model)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == torch.float64
        torch.testing.assert_close(a[name], b[name], atol=1e-9, rtol=0, msg=name)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, bert_dir: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(64))
    # lr 1e30: Adam moves every weight by ~lr on step 1, so step 2's loss is not finite.
    options = _options(tmp_path, bert_dir, data, lr=1e30, warmup_steps=0, save_every=1)
    with pytest.raises(TrainingError, match=r"loss became nan .* at step 2; .*checkpoint"):
        finetune(options)
    last = latest_checkpoint(tmp_path / "out")
    assert last is not None and last.name == "step-00000001"
    state = read_checkpoint(last)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (tmp_path / "out" / "adapter").exists()  # no final adapter from a diverged run
    events = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "event" in r]
    assert events == [{"step": 2, "event": "diverged", "loss": events[0]["loss"]}]


def test_checkpoints_are_pruned_to_keep(tmp_path: Path, bert_dir: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(64))
    result = finetune(_options(tmp_path, bert_dir, data, save_every=2, keep_checkpoints=2))
    assert result.train.steps == 8  # 58 train examples (64 minus 6 held out) in batches of 8
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == ["step-00000006", "step-00000008"]  # every 2 steps and at the end


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, None]),
    ],
)
def test_warmup_then_decay(schedule: str, expected: list[float | None]) -> None:
    factor = WarmupDecay(warmup=2, total=6, schedule=schedule)
    for step, want in enumerate(expected):
        if want is not None:
            assert factor(step) == pytest.approx(want), step


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "translation"}, r"task must be one of .*'translation'"),
        ({"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
        ({"lr": 0.0}, r"lr must be positive, got 0.0"),
        ({"lr": float("nan")}, r"lr must be a number"),
        ({"eval_fraction": 1.0}, r"eval_fraction must be in \(0, 1\), got 1.0"),
        ({"schedule": "step"}, r"schedule must be one of .*'step'"),
        ({"save_every": -1}, r"save_every must be a non-negative integer, got -1"),
        ({"keep_checkpoints": 0}, r"keep_checkpoints must be at least 1"),
        ({"padding": "max_length"}, r"padding must be one of .*'max_length'"),
        ({"truncation_side": "middle"}, r"truncation_side must be one of .*'middle'"),
        ({"precision": "fp16"}, r"precision must be one of .*'fp16'"),
        ({"precision": "bf16", "fsdp": True}, r"precision='bf16' with fsdp is not supported"),
    ],
)
def test_bad_options_name_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainOptions(**kwargs)


@pytest.mark.parametrize("kind", ["seq-cls", "causal-lm"])
def test_bf16_precision_trains_float32_adapters_on_a_bf16_base(
    tmp_path: Path, bert_dir: Path, llama_dir: Path, kind: str
) -> None:
    """The base loads in bf16 and what trains stays float32. The seq-cls head (float32, fed
    bf16 hidden states) only runs under autocast, so that run finishing shows every forward
    (training and eval) had it."""
    if kind == "seq-cls":
        model_dir, data = bert_dir, write_jsonl(tmp_path / "d.jsonl", sentiment_records(48))
    else:
        model_dir, data = llama_dir, write_jsonl(tmp_path / "d.jsonl", completion_records(48))
    result = finetune(_options(tmp_path, model_dir, data, precision="bf16"))
    params = dict(result.model.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    assert trained and all(params[n].dtype == torch.float32 for n in trained)
    frozen = [p.dtype for n, p in params.items() if n not in trained]
    assert frozen and set(frozen) == {torch.bfloat16}
    if kind == "seq-cls":
        assert any(n.startswith("classifier.") for n in trained)  # upcast modules_to_save
    losses = [r["loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(v) for v in result.train.eval_after.values())
    tensors = load_file(result.adapter / "adapter_model.safetensors")
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}


def test_causal_eval_loss_is_the_models_own_loss(llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lorakit.train.data import Collator
    from lorakit.train.distributed import DistEnv
    from lorakit.train.evaluate import evaluate

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    # prompt tokens carry label -100: the loss covers the completion only
    example = {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, -100, 8, 9, 10]}
    metrics = evaluate(model, [example], "causal-lm", Collator(0), DistEnv())
    batch = Collator(0)([example])
    with torch.no_grad():
        expected = model(**batch).loss.item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


class _Terminal:
    """A stream that says it is a terminal, as sys.stderr does in a shell."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    import io

    from lorakit.train.report import Progress

    pipe = io.StringIO()
    lines = Progress(total=4, start=0, stream=pipe)
    assert lines.mode == "lines"
    lines.update(2, 0.5, 100.0, 1e-3)
    lines.log_step(2, 0.5, 100.0, 1e-3)
    assert pipe.getvalue().startswith("step 2/4  loss 0.5000")
    term = _Terminal()
    bar = Progress(total=4, start=0, stream=term)
    assert bar.mode == "bar"
    bar.update(2, 0.5, 100.0, 1e-3)
    bar.log_step(2, 0.5, 100.0, 1e-3)  # no log lines under a bar
    bar.close()
    assert "2/4" in term.text and "loss=0.5000" in term.text and "step 2/4" not in term.text


def test_fsdp_needs_torchrun(tmp_path: Path, bert_dir: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(16))
    with pytest.raises(ConfigError, match="fsdp=True needs several processes; launch with"):
        finetune(_options(tmp_path, bert_dir, data, fsdp=True))


def test_resuming_a_finished_run_changes_nothing(tmp_path: Path, bert_dir: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(40))
    first = finetune(_options(tmp_path, bert_dir, data, save_every=2))
    before = _adapter_tensors(first.model)
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    again = finetune(_options(tmp_path, bert_dir, data, save_every=2, resume=True))
    assert again.train.steps == first.train.steps
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == names
    after = _adapter_tensors(again.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_finetuned_adapter_loads_in_peft(tmp_path: Path, bert_dir: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(48))
    result = finetune(_options(tmp_path, bert_dir, data))
    ids = torch.randint(1000, 2000, (3, 7))
    trained = result.model.eval()(input_ids=ids).logits
    base = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    model = peft.PeftModel.from_pretrained(base, str(result.adapter)).eval()
    torch.testing.assert_close(model(input_ids=ids).logits, trained)  # head included


def test_a_fresh_run_in_the_same_folder_starts_a_fresh_metrics_file(
    tmp_path: Path, bert_dir: Path
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(40))
    finetune(_options(tmp_path, bert_dir, data))
    finetune(_options(tmp_path, bert_dir, data, overwrite=True))
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in records if "eval" in r] == [0, records[-1]["step"]]
