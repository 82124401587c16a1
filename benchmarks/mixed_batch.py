"""Mixed-adapter batches: cost of `lorakit.routing` vs the base model and one adapter; PEFT too.

    .venv/bin/python benchmarks/mixed_batch.py            # 7 rounds (a few minutes on 2 cores)
    .venv/bin/python benchmarks/mixed_batch.py --reps 3 --adapters 16

Workload (the issue's): a Llama-style transformers model (hidden 512, 4 layers, MLP 1376,
8 heads, vocab 4096), fp32 inference, a batch of 64 sequences x 64 tokens; rank-8 adapters
(alpha 16) on every linear layer (q, k, v, o, gate, up, down). Rows are spread over N
adapters (row i -> adapter i mod N; with N > 64 rows use a random 64 of them). Every timed
call of a routed variant enters a fresh `routing` context, so stacking the factors counts.

Variants, interleaved round by round (times: medians; ratios: medians of per-round ratios):
  base      the plain model, no adapters
  single    lorakit, all 64 rows through one adapter (the same model, one adapter active)
  mixed N   lorakit, `with lorakit.routing(model, rows): model(ids)`; with reuse_stacks=True
            the stacked factors of all N adapters are kept between batches
  peft *    PEFT 0.21 with the same adapters: one adapter, and `model(ids, adapter_names=rows)`
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TARGETS, Workload, build_base, interleaved, median, paired_ratio, randomise_b  # noqa: E402

import lorakit  # noqa: E402

BATCH, TOKENS, RANK = 64, 64, 8
WORKLOAD = Workload(batch=BATCH, tokens=TOKENS, rank=RANK)


def lorakit_model(base: nn.Module, n: int) -> nn.Module:
    model = copy.deepcopy(base)
    config = lorakit.LoraConfig(rank=RANK, alpha=2.0 * RANK, targets=TARGETS)
    for i in range(n):
        lorakit.inject(model, config, adapter_name=f"a{i}")
    return randomise_b(model).eval()


def peft_model(base: nn.Module, n: int) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS))
    model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config)
    return randomise_b(model).eval()


def rows_for(n: int) -> list[str]:
    names = [f"a{i}" for i in random.Random(0).sample(range(n), min(n, BATCH))]
    return [names[i % len(names)] for i in range(BATCH)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--adapters", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, robust to other load on a shared machine (use --threads 1)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = build_base(WORKLOAD).eval()
    ids = torch.randint(0, 4096, (BATCH, TOKENS), generator=torch.Generator().manual_seed(1))
    models = {n: lorakit_model(base, n) for n in args.adapters}
    lk = models[args.adapters[0]]  # its first adapter is the "single" variant
    lorakit.set_active(lk, "a0")

    def run(model: nn.Module, **kwargs: object) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                model(input_ids=ids, **kwargs)

        return call

    def routed(model: nn.Module, rows: list[str], reuse: bool = False) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad(), lorakit.routing(model, rows, reuse_stacks=reuse):
                model(input_ids=ids)

        return call

    fns = {"base": run(base), "single": run(lk)}
    for n, model in models.items():
        fns[f"mixed {n}"] = routed(model, rows_for(n))
        fns[f"mixed {n}, reuse_stacks"] = routed(model, rows_for(n), reuse=True)
    if not args.no_peft:
        n = args.adapters[0]
        pm = peft_model(base, n)
        fns["peft single"] = run(pm)
        fns[f"peft mixed {n}"] = run(pm, adapter_names=rows_for(n))
    times = interleaved(fns, args.reps, clock=args.clock)
    med = {k: median(v) for k, v in times.items()}

    print(f"# mixed-adapter batch, {BATCH} x {TOKENS} tokens, rank {RANK} on all linear layers")
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, {args.clock} "
          f"clock, {args.reps} interleaved rounds; ratios: per-round ratios, median")  # fmt: skip
    rows = [("variant", "median ms", "x base", "x single")]
    for name, m in med.items():
        single = "peft single" if name.startswith("peft") else "single"
        rows.append((name, f"{1000 * m:.0f}", f"{paired_ratio(times, name, 'base'):.3f}",
                     f"{paired_ratio(times, name, single):.3f}"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    print("| " + lines[0] + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for line in lines[1:]:
        print("| " + line + " |")


if __name__ == "__main__":
    main()
