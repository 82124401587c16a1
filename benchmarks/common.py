"""Shared pieces of the benchmarks: the workload, the variants, interleaved timing, memory.

Every figure is a ratio of medians measured side by side in one process, with the variants
interleaved (round r runs every variant once, in a rotated order), so slow drift of a shared
machine hits all variants alike.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Workload:
    """A Llama-style model and a batch: the issue's default is hidden 512, 4 layers, 8 x 256."""

    hidden: int = 512
    layers: int = 4
    intermediate: int = 1376
    heads: int = 8
    vocab: int = 4096
    batch: int = 8
    tokens: int = 256
    rank: int = 8
    dropout: float = 0.0

    def label(self) -> str:
        return (
            f"hidden {self.hidden}, {self.layers} layers, MLP {self.intermediate}, "
            f"batch {self.batch}x{self.tokens}, rank {self.rank}, dropout {self.dropout:g}"
        )


def build_base(w: Workload, seed: int = 0) -> nn.Module:
    """The base model, random weights, fp32, all parameters frozen."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=w.hidden,
        intermediate_size=w.intermediate,
        num_hidden_layers=w.layers,
        num_attention_heads=w.heads,
        num_key_value_heads=w.heads,
        vocab_size=w.vocab,
        max_position_embeddings=max(w.tokens, 256),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return model


def input_ids(w: Workload, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, w.vocab, (w.batch, w.tokens), generator=torch.Generator().manual_seed(seed)
    )


def make_variant(name: str, base: nn.Module, w: Workload) -> nn.Module:
    """A copy of `base` prepared as variant `name`: floor | full | lorakit | peft."""
    model = copy.deepcopy(base)
    if name == "full":
        model.requires_grad_(True)
    elif name == "lorakit":
        lorakit.inject(
            model,
            lorakit.LoraConfig(rank=w.rank, alpha=2.0 * w.rank, dropout=w.dropout, targets=TARGETS),
        )
    elif name == "peft":
        import peft

        config = peft.LoraConfig(
            r=w.rank, lora_alpha=2 * w.rank, lora_dropout=w.dropout, target_modules=list(TARGETS)
        )
        model = peft.get_peft_model(model, config)
    elif name != "floor":
        raise ValueError(f"unknown variant {name!r}")
    return model


def randomise_b(model: nn.Module) -> nn.Module:
    """Non-zero B everywhere, so no path can skip work on an all-zero adapter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # benchmark-only shortcut: both libraries name B this way
                p.normal_(0, 0.01)
    return model


def inference_variants(base: nn.Module, w: Workload) -> dict[str, nn.Module]:
    """base, lorakit unmerged / merged, PEFT unmerged: eval mode, non-zero adapters."""
    models = {
        "base": make_variant("floor", base, w),
        "lorakit unmerged": make_variant("lorakit", base, w),
        "lorakit merged": make_variant("lorakit", base, w),
        "peft unmerged": make_variant("peft", base, w),
    }
    for model in models.values():
        randomise_b(model.eval())
    lorakit.merge(models["lorakit merged"])
    return models


def train_step(model: nn.Module, ids: torch.Tensor, floor: bool = False) -> None:
    """Forward, loss, backward; grads dropped afterwards (no optimizer: same for all variants).

    The floor runs the frozen model with its embedding output requiring grad, so the backward
    flows through every layer computing input gradients only.
    """
    if floor:
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
        loss = model(inputs_embeds=embeds.requires_grad_(), labels=ids).loss
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None


def infer_step(model: nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        model(input_ids=ids)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(
    fns: dict[str, Callable[[], None]], reps: int, warmup: int = 1, clock: str = "wall"
) -> dict[str, list[float]]:
    """Seconds per call of each fn over `reps` rounds, variants rotated round by round.

    clock "wall" is elapsed time; "cpu" is this process's CPU time, which on a machine shared
    with other jobs counts only the work this process did (exact with one torch thread).
    """
    now = CLOCKS[clock]
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            start = now()
            fns[name]()
            times[name].append(now() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(times: dict[str, list[float]], name: str, ref: str) -> float:
    """Median over rounds of name's time / ref's time in the same round.

    Variants of one round run back to back, so a machine that speeds up or slows down between
    rounds (other jobs on a shared host) moves both alike and the ratio cancels it.
    """
    return statistics.median(a / b for a, b in zip(times[name], times[ref]))


def ratio_quartiles(times: dict[str, list[float]], name: str, ref: str) -> tuple[float, float]:
    """First and third quartiles of the per-round ratios: how far one round's ratio strays."""
    ratios = [a / b for a, b in zip(times[name], times[ref])]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q1, q3


# -- memory: one fresh process per variant ---------------------------------------------------
#
# CPU tensors come from glibc malloc. With MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB every large
# tensor is its own mmap, returned to the OS when freed, so resident memory tracks live tensors.
# The child runs one warm-up step, resets the kernel's peak-RSS mark (/proc/self/clear_refs),
# runs one step and reports VmHWM minus the resting VmRSS: the step's own peak, in MiB.

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(variant: str, w: Workload) -> dict[str, float]:
    """Run in a fresh process: the peak extra resident memory (MiB) of one train step."""
    base = build_base(w)
    model = make_variant(variant, base, w)
    del base
    model.train()
    ids = input_ids(w)
    train_step(model, ids, floor=variant == "floor")
    gc.collect()
    rest = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    train_step(model, ids, floor=variant == "floor")
    peak = _status_kib("VmHWM")
    return {"rest_mib": rest / 1024, "step_peak_mib": (peak - rest) / 1024}


def measure_memory(variant: str, w: Workload) -> dict[str, float]:
    """`memory_child` in a subprocess of this script (see benchmarks/train_step.py)."""
    env = {**os.environ, **MEMORY_ENV}
    cmd = [
        sys.executable,
        sys.argv[0],
        "--memory-child",
        variant,
        "--workload",
        json.dumps(asdict(w)),
    ]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(rows: list[tuple[str, ...]]) -> str:
    """Rows of strings as an aligned Markdown table; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = [" | ".join(c.ljust(wd) for c, wd in zip(r, widths)) for r in rows]
    sep = " | ".join("-" * wd for wd in widths)
    return "\n".join(["| " + fmt[0] + " |", "| " + sep + " |", *("| " + f + " |" for f in fmt[1:])])
