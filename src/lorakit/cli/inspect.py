"""`lorakit inspect PATH [--json] [--spectrum] [--plot FILE]`: what an adapter folder holds,
without loading a model.

Prints the base model, task and label names the adapter was saved for, the PEFT config,
rank / alpha / scale per adapted module, parameter count, file size, and the base model
fingerprint lorakit records in the safetensors header. `--spectrum` adds the singular values
of each layer's delta s * B A and its effective ranks (see `lorakit.spectrum_report`);
`--plot FILE` draws them into a PNG (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checkpoint import META_FINGERPRINT, META_VERSION, read_adapter
from ..checkpoint.base_model import read_base
from ..checkpoint.io import CONFIG_NAME, WEIGHTS_NAME
from ..checkpoint.peft_format import PREFIX, from_peft
from ..config import scaling
from ..errors import CheckpointError
from ..spectrum_report import adapter_spectrum, format_spectrum, plot_spectrum
from ..table import table_lines

_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")
_B_SUFFIXES = {".lora_A.weight": ".lora_B.weight", ".lora_embedding_A": ".lora_embedding_B"}


def describe(path: str | Path, adapter_name: str = "default", allow_pickle: bool = False) -> dict:
    """A JSON-ready description of the adapter at `path` (see the module docstring).

    Raises:
        CheckpointError: the folder or its files are missing, damaged or unsupported.
    """
    folder, raw, tensors, metadata = read_adapter(path, adapter_name, allow_pickle=allow_pickle)
    config = from_peft(raw, str(folder / CONFIG_NAME))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        weights = folder / "adapter_model.bin"
    base = read_base(raw, metadata, folder, weights)
    shapes = {k.removeprefix(PREFIX): tuple(t.shape) for k, t in tensors.items()}
    numels = {k.removeprefix(PREFIX): t.numel() for k, t in tensors.items()}
    modules = []
    for key, a_shape in sorted(shapes.items()):
        suffix = next((s for s in _A_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        module = key.removesuffix(suffix)
        b_shape = shapes.get(module + _B_SUFFIXES[suffix], ())
        rank = _rank(weights, key, a_shape)
        alpha = config.for_module(module).alpha
        modules.append(
            {
                "module": module,
                "rank": rank,
                "alpha": alpha,
                "scaling": scaling(rank, alpha, config.use_rslora),
                "lora_A": list(a_shape),
                "lora_B": list(b_shape),
                "embedding": suffix == ".lora_embedding_A",
            }
        )
    lora_keys = {m["module"] + s for m in modules for s in (*_A_SUFFIXES, *_B_SUFFIXES.values())}
    others = sorted(k for k in shapes if k not in lora_keys)
    return {
        "path": str(folder),
        "base_model": base.name_or_path,
        "task_type": base.task_type,
        "labels": None if base.labels is None else list(base.labels),
        "config": raw,
        "modules": modules,
        "other_tensors": others,  # modules_to_save, biases, saved embeddings
        "parameters": sum(t.numel() for t in tensors.values()),
        "lora_parameters": sum(numels[k] for k in lora_keys if k in numels),
        "file": weights.name,
        "file_bytes": weights.stat().st_size,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "base_fingerprint": metadata.get(META_FINGERPRINT),
        "lorakit_version": metadata.get(META_VERSION),
    }


def _rank(weights: Path, key: str, a_shape: tuple[int, ...]) -> int:
    """The rank of a LoRA A factor: its first dimension, which must exist and be positive."""
    if len(a_shape) < 2 or a_shape[0] < 1:
        raise CheckpointError(
            f"{weights}: tensor {key!r} has shape {a_shape}; a LoRA A factor is (rank >= 1, "
            "in features, ...)"
        )
    return a_shape[0]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def format_text(info: dict) -> str:
    """The human-readable report of `describe`."""
    c = info["config"]
    targets = c.get("target_modules")
    print_fp = info["base_fingerprint"] or "not recorded (not saved by lorakit)"
    fields = [
        ("adapter", info["path"]),
        ("base model", info["base_model"] or "not recorded"),
        ("task", info["task_type"] or "not recorded"),
        ("file", f"{info['file']}, {_size(info['file_bytes'])}, {'/'.join(info['dtypes'])}"),
        ("parameters", f"{info['parameters']:,} ({info['lora_parameters']:,} in LoRA factors)"),
        ("base fingerprint", print_fp),
        ("rank / alpha", f"{c.get('r')} / {c.get('lora_alpha')}"
         + (" (rsLoRA)" if c.get("use_rslora") else "")),
        ("targets", str(targets)),
        ("dropout, bias", f"{c.get('lora_dropout')}, {c.get('bias')}"),
    ]  # fmt: skip
    if info["labels"] is not None:
        fields.insert(3, ("labels", ", ".join(info["labels"])))
    if c.get("modules_to_save"):
        fields.append(("modules_to_save", str(c["modules_to_save"])))
    if c.get("rank_pattern") or c.get("alpha_pattern"):
        fields.append(("patterns", f"rank {c.get('rank_pattern')}, alpha {c.get('alpha_pattern')}"))
    lines = [f"{label:<17}{value}" for label, value in fields]
    rows = [("module", "rank", "alpha", "scaling", "A", "B")]
    for m in info["modules"]:
        rows.append(
            (m["module"], str(m["rank"]), f"{m['alpha']:g}", f"{m['scaling']:g}",
             "x".join(map(str, m["lora_A"])), "x".join(map(str, m["lora_B"])))
        )  # fmt: skip
    lines += ["", *(line.rstrip() for line in table_lines(rows))]
    if info["other_tensors"]:
        lines += ["", "other tensors: " + ", ".join(info["other_tensors"])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = describe(args.path, args.adapter_name, allow_pickle=args.allow_pickle)
    spectra = None
    if args.spectrum or args.plot:
        spectra = adapter_spectrum(args.path, args.adapter_name, allow_pickle=args.allow_pickle)
        info["spectrum"] = [s.as_dict() for s in spectra]
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_text(info))
        if spectra is not None:
            print("\nspectrum of s * B A per layer\n" + format_spectrum(spectra))
    if args.plot:
        print(f"plot: {plot_spectrum(spectra, args.plot)}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show an adapter folder's config, ranks, size and base fingerprint",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("path", help="adapter folder (adapter_config.json + weights)")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    parser.add_argument(
        "--adapter-name", default="default", help="read PATH/NAME when it holds an adapter"
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="also read a legacy adapter_model.bin"
    )
    parser.add_argument(
        "--spectrum", action="store_true", help="singular values and effective ranks per layer"
    )
    parser.add_argument("--plot", metavar="FILE", help="draw the spectrum into a PNG file")
    parser.set_defaults(func=run)
