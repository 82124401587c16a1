"""Per-layer costs behind the fast path's choices, measured side by side on one layer.

    .venv/bin/python benchmarks/layer_costs.py            # both tables, ~2 min on one core

1. Host time: forward + backward of a tiny adapted Linear (16 -> 16, 4 tokens), where the
   arithmetic is nothing and what is left is Python and dispatch: the cost per layer that
   a GPU pays on small models. lorakit vs PEFT vs a frozen Linear (input gradient only).
2. The fold rule: no_grad forward of one layer (rank 8) through the thin products or the
   transient W' = W + s B A, against the plain GEMM, for N tokens; N (in + out) / (in out) is
   the ratio `fused.merge_pays` compares with 4.

One torch thread; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

import lorakit  # noqa: E402
from lorakit.fused import fused_lora_linear  # noqa: E402


def _median_ratios(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for name, f in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                f()
            times[name].append((time.perf_counter() - start) / calls)
    ref = next(iter(fns))
    return {
        k: (statistics.median(v), statistics.median(a / b for a, b in zip(v, times[ref])))
        for k, v in times.items()
    }


def host_time() -> str:
    import peft

    def linear() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 16))

    frozen = linear().requires_grad_(False)
    ours = linear()
    lorakit.inject(ours, lorakit.LoraConfig(rank=8, targets=("0",)))
    ours_drop = linear()
    lorakit.inject(ours_drop, lorakit.LoraConfig(rank=8, targets=("0",), dropout=0.1))
    theirs = peft.get_peft_model(linear(), peft.LoraConfig(r=8, target_modules=["0"]))
    theirs_drop = peft.get_peft_model(
        linear(), peft.LoraConfig(r=8, target_modules=["0"], lora_dropout=0.1)
    )
    x = torch.randn(4, 16)

    def step(model: nn.Module, grad_x: bool = False) -> Callable[[], None]:
        def run() -> None:
            model(x.clone().requires_grad_(grad_x)).sum().backward()

        return run

    fns = {
        "frozen Linear": step(frozen, True),
        "lorakit": step(ours),
        "peft": step(theirs),
        "lorakit dropout 0.1": step(ours_drop),
        "peft dropout 0.1": step(theirs_drop),
    }
    result = _median_ratios(fns, rounds=5, calls=500)
    rows = [("forward + backward, 16 -> 16, rank 8", "µs", "/ frozen Linear")]
    rows += [(k, f"{t * 1e6:.0f}", f"{r:.2f}") for k, (t, r) in result.items()]
    return table(rows)


def fold_rule() -> str:
    rows = [("in x out", "tokens N", "N (in+out) / (in out)", "thin / base", "fold / base")]
    for d_in, d_out in [(512, 512), (512, 1376), (1376, 512)]:
        w = torch.randn(d_out, d_in)
        a, b = torch.randn(8, d_in), torch.randn(d_out, 8)
        for n in (256, 512, 1024, 2048):
            x = torch.randn(n, d_in)

            def run(merge: bool | None, x=x, w=w, a=a, b=b) -> Callable[[], object]:
                if merge is None:
                    return lambda: x @ w.t()
                return lambda: fused_lora_linear(x, w, None, (a,), (b,), (2.0,), merge=merge)

            with torch.no_grad():
                result = _median_ratios(
                    {"base": run(None), "thin": run(False), "fold": run(True)}, rounds=21, calls=1
                )
            ratio = n * (d_in + d_out) / (d_in * d_out)
            rows.append((f"{d_in} x {d_out}", str(n), f"{ratio:.1f}",
                         f"{result['thin'][1]:.3f}", f"{result['fold'][1]:.3f}"))  # fmt: skip
    return table(rows)


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread\n")
    print(host_time(), "\n")
    print(fold_rule())


if __name__ == "__main__":
    main()
