"""`lorakit finetune --recipe chat` against a plain PEFT training loop on the same job.

    .venv/bin/python benchmarks/llm_train.py [--runs 3] [--max-steps 120] [--eval-generate 50]

Both train SmolLM2-135M-Instruct (rank 16, alpha 32, every linear layer, no dropout, fp32)
on the built-in LLM job's chats: the same tokenized examples (assistant-only labels), batch
8, AdamW lr 2e-3 with clipping at 1.0, 10 warmup steps then cosine decay, seed 0.
- lorakit: `finetune(*recipe_job("chat"))`, what `lorakit finetune --recipe chat` runs
  (head and loss only where labels are, batches of similar length, the fused path).
- peft: what a PEFT user writes: `get_peft_model`, a shuffled `DataLoader` padded to each
  batch's longest example, `model(**batch).loss` over every position, AdamW and
  transformers' cosine schedule.
Each run is a fresh process; they alternate, `--runs` times each; the table shows medians.
Columns: seconds inside training steps, real (non-pad) tokens per second in them, peak
resident memory of the process (VmHWM: model loading included, the same for both), and the
exact match of greedy answers to the held-out prompts after training (one scorer for both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MEMORY_ENV, _status_kib, table  # noqa: E402

VARIANTS = ("lorakit", "peft")
SEED = 0


def run_lorakit(args: argparse.Namespace) -> dict[str, float]:
    from lorakit.train import finetune, recipe_job

    with tempfile.TemporaryDirectory() as out:
        options, lora = recipe_job(
            "chat", out=out, overwrite=True, max_steps=args.max_steps, seed=SEED,
            eval_generate=args.eval_generate, progress="none",
        )  # fmt: skip
        result = finetune(options, lora)
        run_info = json.loads((Path(out) / "run.json").read_text())
    seconds = result.train.train_seconds
    match = run_info["eval_generate"]["after"]["exact_match"]
    return {"seconds": seconds, "tokens_per_s": result.train.tokens / seconds, "exact_match": match}


def run_peft(args: argparse.Namespace) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    from lorakit.llm import resolve_model
    from lorakit.train.chat_job import chat_job_files
    from lorakit.train.data import CausalLMDataset, Collator, pad_token_id, read_records
    from lorakit.train.eval_generate import score_generation
    from lorakit.train.model import load_tokenizer

    torch.manual_seed(SEED)
    folder = resolve_model("smollm2")
    tokenizer = load_tokenizer(folder)
    train_file, eval_file = chat_job_files()
    data = CausalLMDataset(read_records(train_file), tokenizer, 64, train_file, "right")
    loader = DataLoader(
        data, batch_size=8, shuffle=True, collate_fn=Collator(pad_token_id(tokenizer)),
        generator=torch.Generator().manual_seed(SEED),
    )  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(base, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 10, args.max_steps)
    seconds, tokens, step = 0.0, 0, 0
    while step < args.max_steps:
        for batch in loader:
            if step == args.max_steps:
                break
            start = time.perf_counter()
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
            step += 1
    records = read_records(eval_file)
    score = score_generation(model, tokenizer, records, eval_file, args.eval_generate, 16)
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "exact_match": score.exact_match}


def child(variant: str, args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = (run_lorakit if variant == "lorakit" else run_peft)(args)
    figures["peak_mib"] = _status_kib("VmHWM") / 1024
    print(json.dumps(figures))


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, sys.argv[0], "--child", variant, "--max-steps", str(args.max_steps)]
    cmd += ["--eval-generate", str(args.eval_generate), "--threads", str(args.threads)]
    done = subprocess.run(cmd, env={**os.environ, **MEMORY_ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {variant}: {figures}", flush=True)
    return figures


def report(runs: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    lk, pf = med["lorakit"], med["peft"]
    rows = [("variant", "train s", "real tok/s", "peak MiB", "exact match")]
    for v in VARIANTS:
        m = med[v]
        rows.append((v, f"{m['seconds']:.1f}", f"{m['tokens_per_s']:.0f}",
                     f"{m['peak_mib']:.0f}", f"{m['exact_match']:.2f}"))  # fmt: skip
    rows.append(("lorakit / peft", f"{lk['seconds'] / pf['seconds']:.2f}",
                 f"{lk['tokens_per_s'] / pf['tokens_per_s']:.2f}",
                 f"{lk['peak_mib'] / pf['peak_mib']:.2f}",
                 f"{lk['exact_match'] - pf['exact_match']:+.2f}"))  # fmt: skip
    threads = args.threads or torch.get_num_threads()
    head = f"SmolLM2-135M-Instruct, built-in LLM job, {args.max_steps} steps, "
    head += f"medians of {args.runs} runs each, {threads} threads"
    return head + "\n" + table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--eval-generate", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for i in range(args.runs):
        order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            runs[variant].append(measure(variant, args))
    print(report(runs, args))


if __name__ == "__main__":
    main()
