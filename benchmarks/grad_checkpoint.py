"""Gradient checkpointing with LoRA on a SmolLM2-shaped model: train-step time and peak memory.

    .venv/bin/python benchmarks/grad_checkpoint.py [--reps 5] [--batch 8] [--tokens 128]

Model: SmolLM2-135M's shape (llama, hidden 576, 30 layers, MLP 1536, 9 heads / 3 KV heads,
vocab 49,152, tied embeddings) with random weights (time and memory do not depend on the
values). rank 16 on every linear layer. A train step is forward + loss + backward. Times are
interleaved in one process (ratio of medians of per-round ratios); peak memory is measured in a
fresh process per variant (VmHWM above the resting RSS, see common.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MEMORY_ENV, _status_kib, interleaved, paired_ratio, table  # noqa: E402

import lorakit  # noqa: E402
from lorakit.train.grad_checkpoint import enable_gradient_checkpointing  # noqa: E402

VARIANTS = ("plain", "checkpointing")


def build(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config)
    lorakit.inject(model, lorakit.LoraConfig(targets="all-linear", rank=16, alpha=32))
    if variant == "checkpointing":
        enable_gradient_checkpointing(model)
    return model.train()


def step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    for p in model.parameters():
        p.grad = None


def memory_child(variant: str, ids: torch.Tensor) -> dict[str, float]:
    model = build(variant)
    step(model, ids)
    rest = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(model, ids)
    return {"step_peak_mib": (_status_kib("VmHWM") - rest) / 1024}


def measure_memory(variant: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, sys.argv[0], "--memory-child", variant]
    cmd += ["--batch", str(args.batch), "--tokens", str(args.tokens)]
    env = {**os.environ, **MEMORY_ENV}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--memory-child", choices=VARIANTS)
    args = parser.parse_args()
    seeded = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (args.batch, args.tokens), generator=seeded)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, ids)))
        return
    plain = build("plain")
    ckpt = copy.deepcopy(plain)
    enable_gradient_checkpointing(ckpt)
    models = {"plain": plain, "checkpointing": ckpt}
    times = interleaved({n: (lambda m=m: step(m, ids)) for n, m in models.items()}, args.reps)
    memory = {v: measure_memory(v, args) for v in VARIANTS}
    print(f"SmolLM2-135M shape, rank 16 all linear, batch {args.batch} x {args.tokens}, "
          f"{torch.get_num_threads()} threads, {args.reps} rounds")
    rows = [("variant", "step time x plain", "step peak MiB", "peak x plain")]
    for v in VARIANTS:
        peak = memory[v]["step_peak_mib"]
        rows.append((v, f"{paired_ratio(times, v, 'plain'):.2f}", f"{peak:.0f}",
                     f"{peak / memory['plain']['step_peak_mib']:.2f}"))
    print(table(rows))


if __name__ == "__main__":
    main()
