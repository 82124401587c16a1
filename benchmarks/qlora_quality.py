"""QLoRA's quality check: the built-in LLM job on an fp32 base against an NF4 base.

    .venv/bin/python benchmarks/qlora_quality.py [--quantize nf4 fp4 int8] [--max-steps 120]
                                                  [--eval-generate 50]

Runs `lorakit finetune --recipe chat` once per base (`--quantize none` first, then each one
asked for), each in a fresh process, and prints the exact match of greedy answers to the
held-out prompts before and after training, the training seconds and the peak memory. The
issue's target: NF4 + LoRA within 0.05 exact match of fp32 + LoRA. Times depend on the
machine's load; exact match does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MEMORY_ENV, _status_kib, table  # noqa: E402


def child(quantize: str, args: argparse.Namespace) -> dict[str, float]:
    from lorakit.train import finetune, recipe_job

    with tempfile.TemporaryDirectory() as out:
        options, lora = recipe_job(
            "chat", out=out, overwrite=True, max_steps=args.max_steps, seed=0,
            eval_generate=args.eval_generate, progress="none", quantize=quantize,
        )  # fmt: skip
        result = finetune(options, lora)
        scores = json.loads((Path(out) / "run.json").read_text())["eval_generate"]
    return {
        "before": scores["before"]["exact_match"], "after": scores["after"]["exact_match"],
        "seconds": result.train.train_seconds, "peak_mib": _status_kib("VmHWM") / 1024,
    }  # fmt: skip


def measure(quantize: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, sys.argv[0], "--child", quantize, "--max-steps", str(args.max_steps),
           "--eval-generate", str(args.eval_generate)]  # fmt: skip
    done = subprocess.run(cmd, env={**os.environ, **MEMORY_ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"quantize={quantize} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {quantize}: {figures}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", nargs="+", default=["nf4"])
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--eval-generate", type=int, default=50)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    results = {q: measure(q, args) for q in ["none", *args.quantize]}
    full = results["none"]["after"]
    rows = [("base", "exact match before", "after", "after - fp32's", "train s", "peak MiB")]
    for q, r in results.items():
        rows.append((q if q != "none" else "fp32", f"{r['before']:.2f}", f"{r['after']:.2f}",
                     f"{r['after'] - full:+.2f}", f"{r['seconds']:.0f}",
                     f"{r['peak_mib']:.0f}"))  # fmt: skip
    print(f"SmolLM2-135M-Instruct, built-in LLM job, {args.max_steps} steps")
    print(table(rows))


if __name__ == "__main__":
    main()
