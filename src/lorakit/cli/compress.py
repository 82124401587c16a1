"""`lorakit compress PATH --rank K --out DIR`: cut an adapter's ranks by truncated SVD.

Each layer's delta s * B A becomes its best rank-K approximation (exact where the delta's rank
is <= K; no model needed), written to DIR as a PEFT-format adapter that lorakit and PEFT load.
Prints per layer the ranks before and after and the relative error ||dW - dW_K|| / ||dW||
(Frobenius).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..algebra import LayerCompression
from ..algebra_files import compress_adapter
from ..table import table_lines


def format_report(report: list[LayerCompression], out: str) -> str:
    """The per-layer table and a one-line summary."""
    rows = [("module", "rank", "new rank", "relative error")]
    rows += [(r.module, str(r.rank_before), str(r.rank), f"{r.relative_error:.3e}")
             for r in report]  # fmt: skip
    worst = max((r.relative_error for r in report), default=0.0)
    lines = [line.rstrip() for line in table_lines(rows)]
    return "\n".join([*lines, "", f"wrote {out}: {len(report)} layers, max relative error "
                      f"{worst:.3e}"])  # fmt: skip


def run(args: argparse.Namespace) -> int:
    report = compress_adapter(
        args.path, args.rank, args.out,
        adapter_name=args.adapter_name, allow_pickle=args.allow_pickle,
    )  # fmt: skip
    if args.json:
        print(json.dumps([asdict(r) for r in report], indent=2))
    else:
        print(format_report(report, args.out))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compress",
        help="truncate an adapter's ranks by SVD, reporting each layer's error",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("path", help="adapter folder (adapter_config.json + weights)")
    parser.add_argument("--rank", type=int, required=True, help="largest rank kept per layer")
    parser.add_argument("--out", required=True, help="folder to write the compressed adapter to")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--adapter-name", default="default", help="read PATH/NAME when it holds an adapter"
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="also read a legacy adapter_model.bin"
    )
    parser.set_defaults(func=run)
