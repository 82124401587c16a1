"""Peak memory and time of a QLoRA train step: fp32 base vs NF4 base, lorakit vs PEFT.

    .venv/bin/python benchmarks/qlora.py [--model smollm2|1b] [--batch 4] [--tokens 256]
                                         [--steps 3] [--device cpu|cuda]
                                         [--gradient-checkpointing]

Same model and adapter config in every cell: rank 16, alpha 32, every linear layer but the
output head, float32 adapters, AdamW. Bases:
- smollm2: SmolLM2-135M-Instruct (`lorakit.llm.prepare_model()`), loaded as users do:
  `from_pretrained`, and for NF4 with `BitsAndBytesConfig` (double quantization).
- 1b: TinyLlama's shape (hidden 2048, MLP 5632, 22 layers, 32 heads / 4 KV heads, vocab
  32000), random weights, built on the meta device; each Linear is made real one at a time
  (random, then NF4-quantized), so the fp32 model never exists for the NF4 cell.
NF4 computes in float32 on the CPU, bfloat16 on CUDA (`--device cuda`, where the fp32 base
also runs under bf16 autocast).
lorakit: `inject`; PEFT: `get_peft_model` (its bitsandbytes LoRA layers on the NF4 base).
`--floor` adds a cell both libraries share: the NF4 base frozen, no adapter, forward +
backward to the input embeddings (`enable_input_require_grads`; no optimizer step): the
step time no LoRA library can go under, so lorakit / PEFT >= floor / PEFT.
`--gradient-checkpointing` turns on non-reentrant checkpointing of the blocks in every cell
(as QLoRA users run it: PEFT's `prepare_model_for_kbit_training` does by default), so the
weights, not the activations, set the peak.
Each cell is a fresh process (the variants alternate); a step is forward + backward +
AdamW on random token ids, timed after one warm-up step (median). Memory: the process's peak
resident set during the steps (VmHWM reset after loading: the model and everything the steps
allocate, not the loader's transient fp32 copy) on the CPU, `torch.cuda.max_memory_allocated`
on CUDA; on the CPU also that peak above the process's resident set with every library
imported and no model yet (what a GPU's allocator would count: tensors, not library code).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MEMORY_ENV, _status_kib, table  # noqa: E402

CELLS = [(base, lib) for base in ("fp32", "nf4") for lib in ("lorakit", "peft")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINYLLAMA = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
)  # fmt: skip


def nf4_linear(linear: nn.Linear, compute: torch.dtype, device: str) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, linear.bias is not None,
        compute_dtype=compute, quant_type="nf4", compress_statistics=True,
    )  # fmt: skip
    layer.load_state_dict(linear.state_dict())
    return layer.to(device)


def build_1b(base: str, device: str, compute: torch.dtype, **overrides: int) -> nn.Module:
    """TinyLlama's shape (`overrides` change its config), random weights (seed 0); NF4
    Linears quantized one at a time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{**TINYLLAMA, **overrides}))
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in TARGETS:
                real = nn.Linear(child.in_features, child.out_features, child.bias is not None)
                new = nf4_linear(real, compute, device) if base == "nf4" else real.to(device)
                setattr(module, child_name, new)
    for module in model.modules():  # the rest (embeddings, norms, head) is still on meta
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                real = torch.empty_like(p, device=device)
                real.normal_(0, 0.02) if real.dim() > 1 else real.fill_(1.0)
                setattr(module, name, nn.Parameter(real, requires_grad=p.requires_grad))
    rotary = model.model.rotary_emb  # its buffers are computed, not initialised: anew
    model.model.rotary_emb = type(rotary)(model.config).to(device)
    model.is_loaded_in_4bit = base == "nf4"  # what PEFT reads to pick its bnb layers
    return model


def load_smollm2(base: str, device: str, compute: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit.llm import prepare_model

    kwargs = {}
    if base == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(prepare_model(), device_map=device, **kwargs)
    return model


def adapted(model: nn.Module, lib: str, checkpointing: bool) -> nn.Module:
    if checkpointing:  # what both libraries' users call: transformers' own switch
        model.activation_checkpointing_enable({"use_reentrant": False})
    if lib == "frozen":  # the floor: no adapter, gradients reach the inputs only
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if lib == "lorakit":
        import lorakit

        lorakit.inject(model, lorakit.LoraConfig(rank=16, alpha=32, targets=TARGETS))
        return model
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))


def reset_peak_rss() -> None:
    """Make VmHWM restart from the current resident set (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def libraries_rss_mib() -> float:
    """Resident memory once every library any cell uses is imported, before a model exists:
    the process's baseline, the same in every cell (a GPU's allocator never counts it)."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lorakit  # noqa: F401

    gc.collect()
    return _status_kib("VmRSS") / 1024


def child(args: argparse.Namespace, base: str, lib: str) -> dict[str, float]:
    baseline = libraries_rss_mib()
    device = args.device
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    build = build_1b if args.model == "1b" else load_smollm2
    model = adapted(build(base, device, compute), lib, args.gradient_checkpointing).train()
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    vocab = model.config.vocab_size
    ids = torch.randint(
        0, vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    gc.collect()
    reset_peak_rss()  # the peak of the steps, not of loading (which briefly holds fp32 weights)
    times = []
    for _ in range(args.steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _status_kib("VmHWM") / 1024
    above = peak - baseline if device == "cpu" else peak
    return {"step_s": statistics.median(times[1:]), "peak_mib": peak, "above_mib": above}


def measure(args: argparse.Namespace, base: str, lib: str) -> dict[str, float]:
    cmd = [sys.executable, sys.argv[0], "--child", f"{base}/{lib}", "--model", args.model,
           "--batch", str(args.batch), "--tokens", str(args.tokens), "--steps", str(args.steps),
           "--device", args.device]  # fmt: skip
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    done = subprocess.run(cmd, env={**os.environ, **MEMORY_ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{base}/{lib} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[tuple[str, str], dict[str, float]], args: argparse.Namespace) -> str:
    rows = [("base", "library", "step (s)", "peak memory (MiB)", "vs fp32 base",
             "above libraries (MiB)", "vs fp32 base")]  # fmt: skip
    for base, lib in CELLS:
        r, fp32 = results[base, lib], results["fp32", lib]
        rows.append((base, lib, f"{r['step_s']:.2f}", f"{r['peak_mib']:.0f}",
                     f"{r['peak_mib'] / fp32['peak_mib']:.2f}x", f"{r['above_mib']:.0f}",
                     f"{r['above_mib'] / fp32['above_mib']:.2f}x"))  # fmt: skip
    ratios = []
    for base in ("fp32", "nf4"):
        ours, theirs = results[base, "lorakit"], results[base, "peft"]
        time_ratio = ours["step_s"] / theirs["step_s"]
        memory_ratio = ours["peak_mib"] / theirs["peak_mib"]
        ratios.append(
            f"{base}: lorakit/peft step time {time_ratio:.2f}x, memory {memory_ratio:.2f}x"
        )
    if ("nf4", "frozen") in results:
        floor, theirs = results["nf4", "frozen"]["step_s"], results["nf4", "peft"]["step_s"]
        ours = results["nf4", "lorakit"]["step_s"]
        ratios.append(
            f"nf4 frozen base (the floor): {floor:.2f} s; over it lorakit {ours / floor:.2f}x, "
            f"peft {theirs / floor:.2f}x; lowest possible lorakit/peft {floor / theirs:.2f}x"
        )
    checkpointing = ", gradient checkpointing" if args.gradient_checkpointing else ""
    head = (f"{args.model}, batch {args.batch}x{args.tokens}, rank 16 all linear, "
            f"{args.device}{checkpointing}, median of {args.steps} steps")  # fmt: skip
    return "\n".join([head, "", table(rows), "", *ratios])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "1b"), default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--floor", action="store_true", help="add the frozen NF4 base cell")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        base, lib = args.child.split("/")
        print(json.dumps(child(args, base, lib)))
        return
    cells = CELLS + [("nf4", "frozen")] if args.floor else CELLS
    results = {cell: measure(args, *cell) for cell in cells}
    print(report(results, args))


if __name__ == "__main__":
    main()
