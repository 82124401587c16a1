"""QLoRA train-step time side by side in one process: frozen NF4 base, lorakit, PEFT.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qlora_interleaved.py [--layers 2]
        [--vocab 2048] [--reps 5] [--batch 4] [--tokens 256] [--no-checkpointing]

`qlora.py` times each cell in its own process, one after another, so a machine that slows
down between cells moves the ratio (single 1B cells varied by 5-10% between runs). Here the
three variants of the same model run round by round in one process (CPU time, the order
rotated each round) and the table gives the median of the per-round ratios: TinyLlama's
block shape (hidden 2048, MLP 5632, 32 / 4 heads; `--layers` of them, default 2) in NF4
(double quantization, float32 compute), rank 16 on every linear layer, gradient
checkpointing on, batch 4 x 256, forward + loss + backward (+ AdamW for the adapters).
frozen: no adapter, gradients to the input embeddings only: the step no LoRA library can go
under. A small vocabulary (default 2048) keeps the head's GEMM, the same in every variant,
from diluting the ratios: the blocks are what is compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, table  # noqa: E402
from qlora import adapted, build_1b  # noqa: E402

VARIANTS = ("frozen", "lorakit", "peft")


def step_fn(model: torch.nn.Module, ids: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args()
    shape = dict(num_hidden_layers=args.layers, vocab_size=args.vocab)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=gen)
    fns = {}
    for name in VARIANTS:
        base = build_1b("nf4", "cpu", torch.float32, **shape)
        model = adapted(base, name, not args.no_checkpointing).train()
        model.config.use_cache = False
        fns[name] = step_fn(model, ids)
    times = interleaved(fns, args.reps, clock="cpu")
    rows = [("variant", "median step (s)", "x frozen (median of rounds)", "x PEFT")]
    for name in VARIANTS:
        per_round = [a / b for a, b in zip(times[name], times["frozen"])]
        vs_peft = [a / b for a, b in zip(times[name], times["peft"])]
        rows.append((name, f"{statistics.median(times[name]):.2f}",
                     f"{statistics.median(per_round):.3f}",
                     f"{statistics.median(vs_peft):.3f}"))  # fmt: skip
    checkpointing = "no checkpointing" if args.no_checkpointing else "checkpointing"
    print(f"TinyLlama block shape x {args.layers}, vocab {args.vocab}, NF4, rank 16, "
          f"batch {args.batch}x{args.tokens}, {checkpointing}, {args.reps} rounds, CPU time "
          f"({torch.get_num_threads()} threads)\n")  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
