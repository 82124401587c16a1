"""LoRA train-step and inference speed, and train-step memory: lorakit vs PEFT vs the floor.

    .venv/bin/python benchmarks/train_step.py            # full run (under ~10 minutes)
    .venv/bin/python benchmarks/train_step.py --quick    # fewer rounds, smaller sweeps

Prints Markdown tables and writes JSON to benchmarks/results/. Workload (the issue's): a
Llama-style transformers model, hidden 512, 4 layers, MLP 1376, 8 heads, vocab 4096, batch
8 x 256 tokens, fp32, rank 8 (alpha 16) on q, k, v, o, gate, up, down.

Variants: floor = frozen model, forward + backward to the embedding output (input gradients
only, no weight gradient anywhere); lorakit; lorakit unfused (shared-input fusion off:
`lorakit.fuse_shared_inputs(model, None)`, each of q, k, v, gate, up takes its own x A^T);
PEFT (`peft.get_peft_model`, same config); full finetuning. A train step is forward + loss +
backward (no optimizer step, for every variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    TARGETS,
    Workload,
    build_base,
    infer_step,
    inference_variants,
    input_ids,
    interleaved,
    make_variant,
    measure_memory,
    median,
    memory_child,
    paired_ratio,
    randomise_b,
    ratio_quartiles,
    table,
    train_step,
)

import lorakit  # noqa: E402
from lorakit.routing import routing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("train", "infer", "memory", "sweeps")


def train_section(w: Workload, reps: int, clock: str) -> dict[str, list[float]]:
    """floor, full, lorakit, PEFT, and both with dropout 0.1, interleaved in one run."""
    base = build_base(w)
    ids = input_ids(w)
    dropped = dataclasses.replace(w, dropout=0.1)
    models = {
        "floor": make_variant("floor", base, w),
        "full": make_variant("full", base, w),
        "lorakit": make_variant("lorakit", base, w),
        "lorakit unfused": _unfused(make_variant("lorakit", base, w)),
        "peft": make_variant("peft", base, w),
        "lorakit dropout 0.1": make_variant("lorakit", base, dropped),
        "peft dropout 0.1": make_variant("peft", base, dropped),
    }
    for m in models.values():
        m.train()
    fns = {n: _train_fn(m, ids, n == "floor") for n, m in models.items()}
    return interleaved(fns, reps, clock=clock)


def _unfused(model):
    """`model` with shared-input fusion off: every adapted layer takes its own x A^T."""
    lorakit.fuse_shared_inputs(model, None)
    return model


def _train_fn(model, ids, floor):
    def run() -> None:
        train_step(model, ids, floor)

    return run


def _infer_fn(model, ids):
    def run() -> None:
        infer_step(model, ids)

    return run


def _mixed_fn(model, ids, rows):
    def run() -> None:
        with routing(model, rows):
            infer_step(model, ids)

    return run


def infer_section(w: Workload, reps: int, clock: str) -> dict[str, list[float]]:
    """base, lorakit unmerged / merged / mixed batch, PEFT unmerged: no_grad forward, eval mode."""
    base = build_base(w)
    ids = input_ids(w)
    variants = inference_variants(base, w)
    variants["lorakit unmerged, unfused"] = _unfused(randomise_b(make_variant("lorakit", base, w)))
    fns = {n: _infer_fn(m.eval(), ids) for n, m in variants.items()}
    # Mixed batch: 4 adapters, each row its own (2 rows each), one forward (lorakit.routing).
    mixed = make_variant("lorakit", base, w)
    names = ("default", "b", "c", "d")
    for name in names[1:]:
        config = lorakit.LoraConfig(rank=w.rank, alpha=2.0 * w.rank, targets=TARGETS)
        lorakit.inject(mixed, config, adapter_name=name)
    randomise_b(mixed.eval())
    rows = [names[i % len(names)] for i in range(w.batch)]
    fns["lorakit mixed batch, 4 adapters"] = _mixed_fn(mixed, ids, rows)
    return interleaved(fns, reps, clock=clock)


def sweep_section(workloads: list[Workload], reps: int, clock: str) -> list[dict]:
    """floor, lorakit, PEFT train steps for each workload (one interleaved run each)."""
    out = []
    for w in workloads:
        base = build_base(w)
        ids = input_ids(w)
        models = {n: make_variant(n, base, w) for n in ("floor", "lorakit", "peft")}
        models["lorakit unfused"] = _unfused(make_variant("lorakit", base, w))
        fns = {n: _train_fn(m, ids, n == "floor") for n, m in models.items()}
        raw = interleaved(fns, reps, clock=clock)
        times = {n: median(t) for n, t in raw.items()}
        out.append({"workload": dataclasses.asdict(w), "seconds": times, "raw_seconds": raw})
        print(f"  {w.label()}: " + ", ".join(f"{n} {t * 1e3:.0f} ms" for n, t in times.items()))
        del models, fns
    return out


def memory_section(w: Workload, variants: list[tuple[str, float]]) -> dict:
    out = {}
    for variant, p in variants:
        label = variant if p == 0 else f"{variant} dropout {p:g}"
        out[label] = measure_memory(variant, dataclasses.replace(w, dropout=p))
        print(f"  {label}: {out[label]['step_peak_mib']:.0f} MiB")
    return out


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, smaller sweeps")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 5, quick 3)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (use with --threads 1 on a shared "
        "machine: it counts only this process's work)",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=SECTIONS,
        help="which tables to measure (default: all)",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        w = Workload(**json.loads(args.workload))
        print(json.dumps(memory_child(args.memory_child, w)))
        return
    reps = args.reps or (3 if args.quick else 5)
    w = Workload()
    started = time.perf_counter()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, load average {_load()} at start"
    )
    print(
        f"workload: {w.label()}; {reps} interleaved rounds, {args.clock} clock; times: medians, "
        "ratios: medians of per-round ratios\n"
    )

    result: dict[str, object] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "reps": reps,
        "workload": dataclasses.asdict(w),
        "clock": args.clock,
    }
    if "train" in args.sections:
        result.update(train_tables(w, reps, args.clock))
    if "infer" in args.sections:
        result.update(infer_tables(w, reps, args.clock))
    if "memory" in args.sections:
        result.update(memory_tables(w, args.quick))
    if "sweeps" in args.sections:
        result.update(sweep_tables(w, reps, args.clock, args.quick))
    print(f"load average {_load()} at the end (other processes share these cores)")
    result["load_average_end"] = os.getloadavg()
    result["wall_seconds"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in (RESULTS / f"train_step-{stamp}.json", RESULTS / "train_step-latest.json"):
        path.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / f'train_step-{stamp}.json'} ({result['wall_seconds']:.0f} s)")


def train_tables(w: Workload, reps: int, clock: str) -> dict:
    train_raw = train_section(w, reps, clock)
    train = {n: median(t) for n, t in train_raw.items()}
    rows = [("train step", "ms", "/ floor", "/ floor, quartiles", "/ PEFT (same dropout)")]
    for name, t in train.items():
        ref = "peft dropout 0.1" if "dropout" in name else "peft"
        q1, q3 = ratio_quartiles(train_raw, name, "floor")
        rows.append((
            name,
            f"{t * 1e3:.0f}",
            f"{paired_ratio(train_raw, name, 'floor'):.3f}",
            f"{q1:.3f}-{q3:.3f}",
            f"{paired_ratio(train_raw, name, ref):.3f}",
        ))  # fmt: skip
    print(table(rows))
    q1, q3 = ratio_quartiles(train_raw, "lorakit", "lorakit unfused")
    print(
        "shared-input fusion: lorakit / lorakit unfused "
        f"{paired_ratio(train_raw, 'lorakit', 'lorakit unfused'):.3f} "
        f"(quartiles {q1:.3f}-{q3:.3f})\n"
    )
    return {"train_seconds": train, "train_raw_seconds": train_raw}


def infer_tables(w: Workload, reps: int, clock: str) -> dict:
    infer_raw = infer_section(w, 3 * reps, clock)  # short calls: more rounds, same time
    infer = {n: median(t) for n, t in infer_raw.items()}
    rows = [(f"inference (no_grad forward, {3 * reps} rounds)", "ms", "/ base")]
    rows += [
        (n, f"{t * 1e3:.0f}", f"{paired_ratio(infer_raw, n, 'base'):.3f}") for n, t in infer.items()
    ]
    print(table(rows), "\n")
    return {"infer_seconds": infer, "infer_raw_seconds": infer_raw}


def memory_tables(w: Workload, quick: bool) -> dict:
    print("memory: peak resident memory of one train step above the resting process (MiB)")
    if quick:
        mem_variants = [("floor", 0.0), ("lorakit", 0.0), ("peft", 0.0)]
    else:
        mem_variants = [
            ("floor", 0.0),
            ("full", 0.0),
            ("lorakit", 0.0),
            ("peft", 0.0),
            ("lorakit", 0.1),
            ("peft", 0.1),
        ]
    memory = memory_section(w, mem_variants)
    rows = [("train step memory", "MiB", "/ PEFT (same dropout)")]
    for name, m in memory.items():
        ref = memory.get("peft dropout 0.1" if "dropout" in name else "peft")
        rows.append(
            (name, f"{m['step_peak_mib']:.0f}", f"{m['step_peak_mib'] / ref['step_peak_mib']:.3f}")
        )
    print(table(rows), "\n")
    return {"memory_mib": memory}


def sweep_tables(w: Workload, reps: int, clock: str, quick: bool) -> dict:
    print("sweeps (train step):")
    ranks = (4, 64) if quick else (4, 16, 64)
    workloads = [dataclasses.replace(w, rank=r) for r in ranks]
    hiddens = (
        [(256, 688, 4, 4, 8, 256)]
        if quick
        else [
            (256, 688, 4, 4, 8, 256),
            (1024, 2752, 16, 4, 8, 256),
            (2048, 5504, 32, 2, 4, 128),  # shrunk: 2 layers, batch 4 x 128, to keep the run short
        ]
    )
    workloads += [
        dataclasses.replace(w, hidden=h, intermediate=i, heads=nh, layers=nl, batch=b, tokens=t)
        for h, i, nh, nl, b, t in hiddens
    ]
    sweeps = sweep_section(workloads, reps, clock)
    rows = [("sweep", "lorakit / floor", "unfused / floor", "PEFT / floor", "lorakit / PEFT")]
    for s in sweeps:
        wl, raw = Workload(**s["workload"]), s["raw_seconds"]
        pairs = (("lorakit", "floor"), ("lorakit unfused", "floor"), ("peft", "floor"),
                 ("lorakit", "peft"))  # fmt: skip
        rows.append((wl.label(), *(f"{paired_ratio(raw, a, b):.3f}" for a, b in pairs)))
    print(table(rows), "\n")
    return {"sweeps": sweeps}


if __name__ == "__main__":
    main()
