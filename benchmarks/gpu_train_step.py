"""The train-step benchmark on a GPU in bf16: lorakit vs PEFT vs the frozen floor.

    python benchmarks/gpu_train_step.py                  # on a CUDA machine
    python benchmarks/gpu_train_step.py --device cpu --dtype float32 --quick   # a dry run

The variants and ratios of `train_step.py` (floor, full finetuning, lorakit, PEFT, both
with dropout 0.1; inference: base, lorakit unmerged / merged, PEFT unmerged) with the base
in bf16 and float32 adapters (both libraries' default), on two workloads: the issue's
(hidden 512, 4 layers, batch 8 x 256) and a Llama-7B-shaped slice (hidden 4096, MLP 11008,
32 heads, 2 layers, vocab 32000, batch 4 x 1024). Each call is timed to a device
synchronisation; ratios are medians of per-round ratios. Peak memory of a train step is
`torch.cuda.max_memory_allocated` above what was allocated before it.

With `--compile` (default: the issue's small workload) the train table adds the floor and
lorakit compiled as CUDA graphs, `torch.compile(model, mode="reduce-overhead")`: the way to
run small models, whose steps are short enough that kernel launches dominate. Their rows
include compilation only in the warm-up calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Workload,
    build_base,
    infer_step,
    inference_variants,
    input_ids,
    interleaved,
    make_variant,
    median,
    paired_ratio,
    table,
    train_step,
)

WORKLOADS = {
    "issue": Workload(),
    "7b-slice": Workload(
        hidden=4096, intermediate=11008, heads=32, layers=2, vocab=32000, batch=4, tokens=1024
    ),
}
TRAIN_VARIANTS = [("floor", 0.0), ("full", 0.0), ("lorakit", 0.0), ("peft", 0.0)]
TRAIN_VARIANTS += [("lorakit", 0.1), ("peft", 0.1)]
COMPILED_VARIANTS = [("floor", 0.0), ("lorakit", 0.0)]  # mode="reduce-overhead"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _label(name: str, p: float) -> str:
    return name if p == 0 else f"{name} dropout {p:g}"


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    """`model` as CUDA graphs (torch.compile's "reduce-overhead"; plain inductor on a CPU)."""
    return torch.compile(model, mode="reduce-overhead")


def train_section(w: Workload, device, dtype, reps: int, compiled: bool) -> tuple[dict, dict]:
    """Per-round seconds of each train variant, and each one's peak step memory (MiB)."""
    base = build_base(w).to(device, dtype)
    ids = input_ids(w).to(device)
    models = {}
    for name, p in TRAIN_VARIANTS:
        models[_label(name, p)] = make_variant(name, base, dataclasses.replace(w, dropout=p))
    for name, p in COMPILED_VARIANTS if compiled else ():
        model = make_variant(name, base, dataclasses.replace(w, dropout=p)).train()
        models[f"{_label(name, p)} compiled"] = _compiled(model)
    del base
    fns, memory = {}, {}
    for label, model in models.items():
        model.train()
        floor = label.startswith("floor")

        def run(model=model, floor=floor) -> None:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: earlier outputs are dead
            train_step(model, ids, floor)
            _sync(device)

        fns[label] = run
        run()  # warm-up, then one measured step for memory
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            run()
            memory[label] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return interleaved(fns, reps, warmup=2), memory


def infer_section(w: Workload, device, dtype, reps: int) -> dict:
    base = build_base(w).to(device, dtype)
    ids = input_ids(w).to(device)
    fns = {}
    for label, model in inference_variants(base, w).items():

        def run(model=model) -> None:
            infer_step(model, ids)
            _sync(device)

        fns[label] = run
    return interleaved(fns, reps, warmup=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny workloads, 3 rounds")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument(
        "--compile", nargs="*", default=["issue"], choices=list(WORKLOADS),
        help="workloads that also time compiled (reduce-overhead) steps (default: issue; "
        "none: --compile alone)",
    )  # fmt: skip
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    reps = 3 if args.quick else args.reps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, {args.dtype}, {reps} rounds; ratios: medians of "
          "per-round ratios\n")  # fmt: skip
    results = {}
    for key in args.workloads:
        w = WORKLOADS[key]
        if args.quick:
            w = dataclasses.replace(w, hidden=64, intermediate=128, heads=4, vocab=256, layers=2)
        started = time.perf_counter()
        train, memory = train_section(w, device, dtype, reps, key in args.compile)
        rows = [("train step", "ms", "/ floor", "/ PEFT (same dropout)", "peak MiB", "/ PEFT")]
        for label, t in train.items():
            ref = "peft dropout 0.1" if "dropout" in label else "peft"
            mem = memory.get(label)
            mem_ref = memory.get(ref)
            rows.append((
                label, f"{median(t) * 1e3:.2f}", f"{paired_ratio(train, label, 'floor'):.3f}",
                f"{paired_ratio(train, label, ref):.3f}",
                "-" if mem is None else f"{mem:.0f}",
                "-" if mem is None or not mem_ref else f"{mem / mem_ref:.3f}",
            ))  # fmt: skip
        infer = infer_section(w, device, dtype, 3 * reps)
        irows = [("inference", "ms", "/ base")]
        irows += [(k, f"{median(t) * 1e3:.2f}", f"{paired_ratio(infer, k, 'base'):.3f}")
                  for k, t in infer.items()]  # fmt: skip
        print(f"## {key}: {w.label()}\n\n{table(rows)}\n\n{table(irows)}\n")
        if "lorakit compiled" in train:
            pairs = (("lorakit compiled", "floor compiled"), ("lorakit compiled", "lorakit"),
                     ("floor compiled", "floor"))  # fmt: skip
            print("compiled (reduce-overhead): " + ", ".join(
                f"{a} / {b} {paired_ratio(train, a, b):.3f}" for a, b in pairs) + "\n")  # fmt: skip
        print(f"({time.perf_counter() - started:.0f} s)\n", flush=True)
        results[key] = {"workload": dataclasses.asdict(w), "train": train, "memory_mib": memory,
                        "infer": infer}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
