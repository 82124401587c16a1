"""LoftQ against a fresh adapter: how close an NF4 base + adapter starts to the float model.

    .venv/bin/python benchmarks/loftq.py [--model smollm2|tiny] [--rank 16] [--alpha 32]
                                         [--iters 1 5]

Loads the model in float32 and in NF4 as `lorakit finetune --quantize nf4` does (blocks of 64,
double quantization, float32 compute), injects rank-r adapters on every linear layer, and
compares, against the float model:
- weight error: ||W - (Q + s B A)|| / ||W|| per adapted layer (mean and max over the layers);
- logits error: ||logits - float logits|| / ||float logits||, and the mean KL divergence of
  the next-token distributions (float || quantized), on a fixed English text (smollm2) or
  random token ids (tiny: a random-weight Llama of hidden 256, built here).
A fresh adapter (B = 0) leaves the NF4 error as it is; LoftQ (`lorakit.loftq_init`, with the
float state dict, for each --iters) fits the adapter to it. Errors do not depend on the
machine; the seconds of `loftq_init` do.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

import lorakit  # noqa: E402
from lorakit.layers.dequantize import dequantized_weight  # noqa: E402
from lorakit.llm.model import prepare_model  # noqa: E402
from lorakit.train.model import load_model  # noqa: E402
from lorakit.train.quantize import prepare_quantized, quantization_config  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog. Large language models are trained on "
    "text from the web, books and code; quantizing their weights to four bits saves memory "
    "at the cost of a small rounding error in every layer."
)


def tiny_folder(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def token_ids(folder: Path, tiny: bool) -> torch.Tensor:
    if tiny:
        return torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(1))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(TEXT, return_tensors="pt").input_ids


def nf4_model(folder: Path, lora: lorakit.LoraConfig) -> torch.nn.Module:
    model = load_model(folder, "causal-lm", quantization_config=quantization_config("nf4", False))
    prepare_quantized(model)  # the training layout: no CPU inference repacking
    lorakit.inject(model, lora)
    return model.eval()


def errors(model: torch.nn.Module, full: dict, ids: torch.Tensor, want: torch.Tensor) -> list:
    """[mean weight error, max weight error, logits error, mean KL] of `model`."""
    weight = []
    with torch.no_grad():
        for name, layer in lorakit.lora_layers(model):
            w = full[f"{name}.weight"].float()
            approx = dequantized_weight(layer) + layer.delta_weight("default").float()
            weight.append(float((w - approx).norm() / w.norm()))
        logits = model(ids).logits.float()
    rel = float((logits - want).norm() / want.norm())
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), want.log_softmax(-1),
                                    log_target=True, reduction="none").sum(-1).mean()  # fmt: skip
    return [sum(weight) / len(weight), max(weight), rel, float(kl)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = args.model == "tiny"
        folder = tiny_folder(Path(tmp)) if tiny else prepare_model()
        lora = lorakit.LoraConfig(rank=args.rank, alpha=args.alpha, targets="all-linear")
        full_model = load_model(folder, "causal-lm").eval()
        full = {k: v.detach() for k, v in full_model.state_dict().items()}
        ids = token_ids(folder, tiny)
        with torch.no_grad():
            want = full_model(ids).logits.float()
        rows = [("init", "weight err mean", "weight err max", "logits err", "KL", "seconds")]
        fresh = errors(nf4_model(folder, lora), full, ids, want)
        rows.append(("fresh (B = 0)", *(f"{e:.4f}" for e in fresh), "-"))
        for iters in args.iters:
            model = nf4_model(folder, lora)
            start = time.perf_counter()
            lorakit.loftq_init(model, full, iters=iters)
            seconds = time.perf_counter() - start
            found = errors(model, full, ids, want)
            rows.append((f"loftq, {iters} iter", *(f"{e:.4f}" for e in found), f"{seconds:.1f}"))
    print(f"{args.model}: NF4 base, rank {args.rank}, alpha {args.alpha:g}, all linear layers")
    print(table(rows))


if __name__ == "__main__":
    main()
