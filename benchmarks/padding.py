"""The share of pad tokens per epoch with random, by-length and packed batches.

    .venv/bin/python benchmarks/padding.py [--max-length 64 128] [--batch-size 8] [--epochs 3]

The data is the built-in LLM job's training chats (`src/lorakit/llm/data/train.jsonl`),
tokenized as `lorakit finetune --recipe chat` does (SmolLM2-135M-Instruct's tokenizer via
`lorakit.llm.prepare_model()`, its chat template, assistant-only labels). Each epoch's
micro-batches come from the training loop's own data order (`data_order.micro_batches`) and
are collated by its own collators, so the figures are what training computes: positions
(rows x width of the batch tensors), of which pad is the share that holds no real token.
No model runs; the figures are exact counts, not timings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

from lorakit.train.data_order import micro_batches  # noqa: E402
from lorakit.train.distributed import DistEnv  # noqa: E402
from lorakit.train.options import TrainOptions  # noqa: E402
from lorakit.train.packing import REAL_TOKENS, PackedCollator  # noqa: E402

BATCHINGS = ("random", "by-length", "packed")


def chat_dataset(max_length: int) -> tuple[Any, int]:
    """The LLM job's training chats tokenized for `max_length`, and the pad id."""
    from lorakit.llm import prepare_model
    from lorakit.train.chat_job import chat_job_files
    from lorakit.train.data import CausalLMDataset, pad_token_id, read_records
    from lorakit.train.model import load_tokenizer

    tokenizer = load_tokenizer(prepare_model())
    train_file, _ = chat_job_files()
    data = CausalLMDataset(read_records(train_file), tokenizer, max_length, train_file)
    return data, pad_token_id(tokenizer)


def count_epoch(data: Any, options: TrainOptions, pad: int, epoch: int) -> tuple[int, int, int]:
    """(rows, positions, real tokens) of one epoch's micro-batches, as training collates them."""
    from lorakit.train.data import Collator

    collate = PackedCollator(pad, options.max_length) if options.batching == "packed" else None
    collate = collate or Collator(pad)
    rows = positions = real = 0
    for micro in micro_batches(data, options, DistEnv(), epoch):
        batch = collate([data[i] for i in micro])
        rows += batch["input_ids"].shape[0]
        positions += batch["input_ids"].numel()
        real += int(batch[REAL_TOKENS] if REAL_TOKENS in batch else batch["attention_mask"].sum())
    return rows, positions, real


def rows_for(max_length: int, batch_size: int, epochs: int) -> list[tuple[str, ...]]:
    """One table row per batching: means over `epochs` epochs."""
    data, pad = chat_dataset(max_length)
    out = []
    for batching in BATCHINGS:
        options = TrainOptions(max_length=max_length, batch_size=batch_size, batching=batching)
        counts = [count_epoch(data, options, pad, e) for e in range(epochs)]
        rows, positions, real = (sum(c[i] for c in counts) / epochs for i in range(3))
        share = 1 - real / positions
        out.append((str(max_length), batching, f"{rows:.0f}", f"{positions:.0f}",
                    f"{real:.0f}", f"{share:.1%}", f"{positions / real:.3f}"))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    header = ("max_length", "batching", "rows", "positions", "real tokens", "pad share",
              "positions / real")  # fmt: skip
    body = [r for n in args.max_length for r in rows_for(n, args.batch_size, args.epochs)]
    print(f"pad tokens per epoch (mean of {args.epochs}), batch {args.batch_size}, "
          f"{len(chat_dataset(args.max_length[0])[0])} chats of the LLM job")  # fmt: skip
    print(table([header, *body]))


if __name__ == "__main__":
    main()
