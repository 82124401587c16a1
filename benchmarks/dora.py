"""DoRA train step: lorakit DoRA vs lorakit LoRA vs PEFT DoRA (time ratios, peak memory).

    .venv/bin/python benchmarks/dora.py --reps 3 --threads 1 --clock cpu

The workload is benchmarks/common.py's (Llama-style, hidden 512, 4 layers, batch 8 x 256,
fp32, rank 8 on q, k, v, o, gate, up, down). A train step is forward + loss + backward; the
variants run interleaved in one process (ratios are medians of per-round ratios); memory is
each variant's step peak in a fresh process (see common.py). Issue 14's targets: DoRA step
<= 1.25x lorakit LoRA's and <= 0.7x PEFT DoRA's, peak memory <= PEFT DoRA's.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MEMORY_ENV,
    TARGETS,
    Workload,
    _status_kib,
    build_base,
    input_ids,
    interleaved,
    median,
    paired_ratio,
    table,
    train_step,
)

import lorakit  # noqa: E402

VARIANTS = ("lorakit lora", "lorakit dora", "peft dora")


def make(name: str, base: nn.Module, w: Workload) -> nn.Module:
    """A copy of `base` with the variant's adapter on TARGETS, B non-zero, in training mode."""
    model = copy.deepcopy(base)
    if name.startswith("lorakit"):
        config = lorakit.LoraConfig(rank=w.rank, alpha=2.0 * w.rank, dropout=w.dropout,
                                    targets=TARGETS, use_dora=name.endswith("dora"))  # fmt: skip
        lorakit.inject(model, config)
    else:
        import peft

        config = peft.LoraConfig(r=w.rank, lora_alpha=2 * w.rank, lora_dropout=w.dropout,
                                 target_modules=list(TARGETS), use_dora=True)  # fmt: skip
        model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return model.train()


def memory_child(name: str, w: Workload) -> dict[str, float]:
    """In a fresh process: one warm-up step, then the peak extra resident memory of a step."""
    model = make(name, build_base(w), w)
    ids = input_ids(w)
    train_step(model, ids)
    gc.collect()
    rest = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    train_step(model, ids)
    return {"step_peak_mib": (_status_kib("VmHWM") - rest) / 1024}


def measure_memory(name: str, w: Workload, threads: int | None) -> float:
    cmd = [sys.executable, __file__, "--memory-child", name, "--dropout", str(w.dropout)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, **MEMORY_ENV}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["step_peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w = Workload(dropout=args.dropout)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, w)))
        return
    base, ids = build_base(w), input_ids(w)
    models = {name: make(name, base, w) for name in VARIANTS}
    fns = {name: (lambda m=m: train_step(m, ids)) for name, m in models.items()}
    raw = interleaved(fns, args.reps, clock=args.clock)
    del models, fns
    print(f"workload: {w.label()}; {args.reps} rounds, {args.clock} clock, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    rows = [("train step", "ms", "/ lorakit lora", "/ peft dora", "step peak MiB")]
    for name in VARIANTS:
        mib = "-" if args.no_memory else f"{measure_memory(name, w, args.threads):.0f}"
        rows.append((
            name, f"{median(raw[name]) * 1e3:.0f}",
            f"{paired_ratio(raw, name, 'lorakit lora'):.3f}",
            f"{paired_ratio(raw, name, 'peft dora'):.3f}", mib,
        ))  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
