"""`lorakit merge --base MODEL_DIR --adapter PATH --out DIR`: fold an adapter into a model.

Loads the `transformers` model in MODEL_DIR (its config's `architectures[0]`, local files
only), loads the adapter (PEFT format) into it, merges W' = W + s B A, removes the adapter
layers and writes a plain `transformers` folder (safetensors) that `from_pretrained` loads
with the adapted outputs. Tokenizer and other side files of MODEL_DIR are copied along.
The folder is written beside DIR under a temporary name and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ..checkpoint import load_adapter, read_adapter
from ..errors import CheckpointError
from ..inject import lora_layers
from ..merge import merge_and_unload

# Files of a model folder that describe the weights; everything else (tokenizer, generation
# config, README) is copied from the base folder when save_pretrained did not write it.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".h5", ".msgpack")


def load_base(model_dir: Path) -> nn.Module:
    """The transformers model saved in `model_dir`, by its config's first architecture.

    Raises:
        CheckpointError: no folder, no config.json, an unknown architecture, unreadable weights.
    """
    import transformers

    if not model_dir.is_dir():
        raise CheckpointError(f"--base {model_dir} does not exist or is not a folder")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} holds no config.json; --base needs a transformers "
                              "model folder (save_pretrained)")  # fmt: skip
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{model_dir / 'config.json'}: {err}") from None
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise CheckpointError(
            f"{model_dir / 'config.json'}: architectures={architectures!r} names no "
            "transformers model class"
        )
    try:
        return cls.from_pretrained(model_dir, local_files_only=True).eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{model_dir}: cannot load {cls.__name__}: {err}") from None


def merge_folder(
    base: Path, adapter: Path, out: Path, adapter_name: str = "default", allow_pickle: bool = False
) -> tuple[int, Path]:
    """Write base + adapter, merged, to `out`; returns (layers merged, out).

    Raises:
        CheckpointError: `out` exists and is not empty, or base / adapter cannot be read.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out {out} exists and is not empty; pick a new folder")
    read_adapter(adapter, adapter_name, allow_pickle=allow_pickle)  # fail fast, before the model
    model = load_base(base)
    load_adapter(model, adapter, adapter_name, allow_pickle=allow_pickle)
    layers = len(list(lora_layers(model)))
    merge_and_unload(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)  # transformers writes safetensors
        for f in base.iterdir():
            side_file = f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES)
            if side_file and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return layers, out


def run(args: argparse.Namespace) -> int:
    layers, out = merge_folder(
        Path(args.base), Path(args.adapter), Path(args.out), args.adapter_name, args.allow_pickle
    )
    print(f"merged {args.adapter} into {layers} layers of {args.base} -> {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge an adapter into its base model and save a plain transformers folder",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--base", required=True, metavar="MODEL_DIR",
                        help="transformers model folder (config.json + weights)")  # fmt: skip
    parser.add_argument("--adapter", required=True, metavar="PATH", help="adapter folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="new folder to write")
    parser.add_argument(
        "--adapter-name", default="default", help="read PATH/NAME when it holds an adapter"
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="also read a legacy adapter_model.bin"
    )
    parser.set_defaults(func=run)
