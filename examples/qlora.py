"""QLoRA from Python: SmolLM2-135M-Instruct with its linear layers as 4-bit NF4 codes and
float32 LoRA adapters on every one of them, a few steps of the built-in chat job.

The command line equivalent is `lorakit finetune --recipe chat --quantize nf4`. The adapter
it saves is an ordinary PEFT-format adapter: it loads onto the full-precision model too.

python examples/qlora.py    # ~3 CPU-minutes (4 steps, SmolLM2 loaded twice; converted once)
"""

from pathlib import Path

import torch

import lorakit
from lorakit.llm import generate, load_causal_lm
from lorakit.train import finetune, recipe_job
from lorakit.train.chat_job import chat_job_files

# A short held-out file keeps the before/after evaluation quick.
held_out = Path("runs/qlora-eval8.jsonl")
held_out.parent.mkdir(parents=True, exist_ok=True)
held_out.write_text("".join(chat_job_files()[1].read_text().splitlines(True)[:8]))

options, lora = recipe_job(
    "chat",
    quantize="nf4",  # bitsandbytes 4-bit base, double quantization; adapters in float32
    precision="bf16" if torch.cuda.is_available() else "fp32",  # the 4-bit compute dtype
    eval_file=str(held_out),
    max_steps=4,  # a demonstration: the recipe runs 120 steps
    batch_size=4,
    eval_generate=0,
    out="runs/qlora",
    overwrite=True,
)
result = finetune(options, lora)  # prints the summary table

# The adapter trained on the 4-bit base, on the full-precision model.
model, tokenizer = load_causal_lm("smollm2")
model = lorakit.from_pretrained(model, result.adapter)
chat = [{"role": "user", "content": "3rd of May 1999"}]
print("answer:", generate(model, tokenizer, messages=chat, max_new_tokens=16))
