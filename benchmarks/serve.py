"""`lorakit serve` under load: concurrent HTTP requests on one adapter, spread over 16, and on
the base, against what a PEFT user would write (one request at a time with `set_adapter`).

    .venv/bin/python benchmarks/serve.py          # the issue's sizes: minutes on 2 cores
    .venv/bin/python benchmarks/serve.py --requests 16 --prompt-tokens 32 --new-tokens 8

Workload (the issue's): SmolLM2-135M-Instruct (`lorakit.llm.prepare_model()`), 16 adapters
(rank 8, alpha 16, every linear layer, random B so they differ), 64 requests sent at once of
~64 prompt tokens, 32 new tokens each (greedy, `ignore_eos`, so every answer has that length).

Variants:
  (a) one adapter   every request names adapter a0, through HTTP to `lorakit serve`
  (b) all adapters  request i names a{i mod 16}, through HTTP
  (c) PEFT loop     in this process: PEFT's PeftModel with the same 16 adapter folders,
                    `set_adapter` then `generate`, one request after another
  (d) base          every request names the base model, through HTTP

Throughput: all completion tokens / the wall time from sending the first request to the last
answer. Latency: from sending (all requests go at once) to the full answer; p50 and p95.
The server runs with --max-batch = --requests, so every request decodes in one batch.

Measured at the issue's sizes, `benchmarks/serve.py --threads 1` (one thread; the machine's
other core ran another job):

| variant          | tokens/s | x (a) | p50 s  | p95 s  | wall s |
| ---------------- | -------- | ----- | ------ | ------ | ------ |
| (a) one adapter  | 52.5     | 1.00  | 39.01  | 39.04  | 39.0   |
| (b) all adapters | 52.8     | 1.01  | 38.72  | 38.75  | 38.8   |
| (d) base         | 62.1     | 1.18  | 32.94  | 32.99  | 33.0   |
| (c) PEFT loop    | 9.2      | 0.18  | 118.71 | 212.02 | 221.9  |

(b)/(a) = 1.01 (target >= 0.85), (b)/(c) = 5.73 (target >= 3). Every request arrives at
once and decodes in one batch, so all finish together (p50 = p95). Prefills run one request
at a time, so the fewer new tokens per prompt token, the smaller the gain over the loop (at a
quarter of the size, 16 requests, on a loaded machine: (b)/(a) 0.97, (b)/(c) 3.98; with 32
prompt and 8 new tokens (b)/(c) was 1.4).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import lorakit
from lorakit.llm import load_causal_lm, prepare_model

RANK = 8


def make_adapters(folder: Path, out: Path, n: int, seed: int = 0) -> list[Path]:
    """n adapters of the model in `folder`, rank 8 on every linear layer, random A and B."""
    model, _ = load_causal_lm(folder)
    config = lorakit.LoraConfig(rank=RANK, alpha=2.0 * RANK, targets="all-linear")
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        lorakit.inject(model, config, adapter_name=f"a{i}")
        with torch.no_grad():
            for layer in (m for m in model.modules() if isinstance(m, lorakit.LoraLayer)):
                b = layer.lora[f"a{i}"].lora_B
                b.copy_(torch.randn(b.shape, generator=generator) * 0.02)
        paths.append(lorakit.save_adapter(model, out / f"a{i}", f"a{i}"))
    return paths


def prompts(tokenizer, n: int, tokens: int) -> list[str]:
    """n different texts of about `tokens` tokens each."""
    words = ("the quick brown fox jumps over the lazy dog while a small bird sings about the "
             "weather in the old town and people walk slowly to the market").split()  # fmt: skip
    texts = []
    for i in range(n):
        text = f"Request {i}:"
        while len(tokenizer(text)["input_ids"]) < tokens:
            text += " " + words[(i * 7 + len(text)) % len(words)]
        texts.append(text)
    return texts


def start_server(folder: Path, adapters: list[Path], threads: int, batch: int) -> tuple:
    argv = [sys.executable, "-m", "lorakit", "serve", "--model", str(folder), "--port", "0",
            "--max-batch", str(batch), "--max-queue", str(batch),
            *(x for i, p in enumerate(adapters) for x in ("--adapter", f"a{i}={p}"))]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    for line in proc.stdout:
        if "listening on " in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line.split("listening on ")[1].split()[0]
    raise SystemExit("the server did not start")


async def _ask_all(url: str, models: list[str], texts: list[str], new_tokens: int):
    import httpx

    limits = httpx.Limits(max_connections=len(texts))
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        start = time.perf_counter()

        async def ask(model: str, text: str) -> tuple[float, int]:
            body = {"model": model, "prompt": text, "max_tokens": new_tokens,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            reply = await client.post("/v1/completions", json=body)
            reply.raise_for_status()
            return time.perf_counter() - start, reply.json()["usage"]["completion_tokens"]

        done = await asyncio.gather(*(ask(m, t) for m, t in zip(models, texts)))
        return time.perf_counter() - start, done


def http_variant(url: str, models: list[str], texts: list[str], new_tokens: int) -> dict:
    wall, done = asyncio.run(_ask_all(url, models, texts, new_tokens))
    return summary(wall, [t for t, _ in done], sum(n for _, n in done))


def peft_loop(folder: Path, adapters: list[Path], texts: list[str], new_tokens: int) -> dict:
    """(c): one request at a time, `set_adapter` then greedy `generate` (PEFT, in-process)."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = peft.PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    latencies, tokens = [], 0
    start = time.perf_counter()
    with torch.no_grad():
        for i, text in enumerate(texts):
            model.set_adapter(f"a{i % len(adapters)}")
            ids = tokenizer(text, return_tensors="pt")
            out = model.generate(**ids, **options)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
            latencies.append(time.perf_counter() - start)
    return summary(time.perf_counter() - start, latencies, tokens)


def summary(wall: float, latencies: list[float], tokens: int) -> dict:
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else []
    p95 = q[18] if q else latencies[0]
    return {"tokens/s": tokens / wall, "p50 s": statistics.median(latencies), "p95 s": p95,
            "wall s": wall, "tokens": tokens}  # fmt: skip


def table(results: dict[str, dict]) -> str:
    ref = results["(a) one adapter"]["tokens/s"]
    lines = ["| variant | tokens/s | x (a) | p50 s | p95 s | wall s |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['tokens/s']:.1f} | {r['tokens/s'] / ref:.2f} | "
                     f"{r['p50 s']:.2f} | {r['p95 s']:.2f} | {r['wall s']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-peft", action="store_true", help="leave out (c)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = prepare_model()
    _, tokenizer = load_causal_lm(folder)
    texts = prompts(tokenizer, args.requests, args.prompt_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(folder, Path(tmp), args.adapters)
        proc, url = start_server(folder, adapters, args.threads, args.requests)
        try:
            results = run_variants(url, adapters, texts, args)
        finally:
            proc.terminate()
            proc.wait()
        if not args.skip_peft:
            results["(c) PEFT loop"] = peft_loop(folder, adapters, texts, args.new_tokens)
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads; {args.requests} requests x ~{args.prompt_tokens} prompt "
        f"tokens, {args.new_tokens} new tokens, {args.adapters} adapters (rank {RANK})"
    )
    print(table(results))
    b = results["(b) all adapters"]["tokens/s"]
    print(f"(b)/(a) = {b / results['(a) one adapter']['tokens/s']:.2f} (target >= 0.85)")
    if "(c) PEFT loop" in results:
        print(f"(b)/(c) = {b / results['(c) PEFT loop']['tokens/s']:.2f} (target >= 3)")


def run_variants(url: str, adapters: list[Path], texts: list[str], args) -> dict[str, dict]:
    n = len(adapters)
    models = {"(a) one adapter": ["a0"] * len(texts),
              "(b) all adapters": [f"a{i % n}" for i in range(len(texts))],
              "(d) base": [str(prepare_model())] * len(texts)}  # fmt: skip
    for names in models.values():  # warm up: first use of each adapter stacks its factors
        http_variant(url, sorted(set(names)), texts[: len(set(names))], 2)
    return {name: http_variant(url, names, texts, args.new_tokens) for name, names in
            models.items()}  # fmt: skip


if __name__ == "__main__":
    main()
