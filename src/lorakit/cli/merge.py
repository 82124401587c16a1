"""`lorakit merge [--base MODEL_DIR] --adapter PATH --out DIR`: fold an adapter into a model.

Loads the `transformers` model in MODEL_DIR (local files only; default: the base model the
adapter records, a folder or the "smollm2" alias) with the head of the
adapter's task, loads the adapter (PEFT format) into it, merges W' = W + s B A, removes the
adapter layers and writes a plain `transformers` folder (safetensors) that `from_pretrained`
loads with the adapted outputs. Tokenizer and other side files of MODEL_DIR are copied along.
The folder is written beside DIR under a temporary name and renamed into place at the end.

An adapter trained on a quantized base (`finetune --quantize nf4|fp4|int8`, QLoRA) learned to
correct that base's rounding, so its faithful merge is dequant(Q(W)) + s B A: the base is
loaded quantized as in training (--quantized-base, default: the run.json's --quantize),
every quantized layer dequantized to the dtype it was loaded in, the adapter added in
full precision, and the folder written without a quantization config: a plain model that
gives the quantized base + adapter's outputs up to float rounding.

The task comes from --task, else the adapter's `task_type`, else the `run.json` that
`lorakit finetune` writes beside its adapter, else the model folder's config
(`architectures[0]`). A classifier's label names come from the adapter (lorakit_id2label),
else from that run.json.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any, get_args

from torch import nn

from ..checkpoint import load_adapter, read_adapter
from ..checkpoint.atomic import atomic_folder
from ..checkpoint.base_model import BaseModelInfo, read_base
from ..checkpoint.io import PICKLE_NAME, WEIGHTS_NAME, read_json
from ..errors import CheckpointError
from ..llm.model import SMOLLM2, resolve_model
from ..merge import merge_and_unload
from ..train.model import check_weight_files, head_labels, load_model, read_model_config
from ..train.options import TASKS
from ..train.quantize import Quantize, quantization_config
from ..tree import lora_layers

# Files of a model folder that describe the weights; everything else (tokenizer, generation
# config, README) is copied from the base folder when save_pretrained did not write it.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".h5", ".msgpack")
RUN_FILE = "run.json"  # written by `lorakit finetune` beside its adapter folder
_PEFT_PREFIX = "base_model.model."


def load_base(
    model_dir: Path,
    task: str | None = None,
    labels: dict[str, int] | None = None,
    quantize: Quantize = "none",
) -> nn.Module:
    """The transformers model saved in `model_dir`: with `task`'s head (and `labels`) when
    given, else by its config's first architecture; quantized as `finetune --quantize` does
    when `quantize` is not "none".

    Raises:
        CheckpointError: no folder, no config.json, an unknown architecture, unreadable weights.
        ConfigError: the checkpoint's classification head does not fit `labels`.
    """
    if not model_dir.is_dir():
        raise CheckpointError(f"--base {model_dir} does not exist or is not a folder")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} holds no config.json; --base needs a transformers "
                              "model folder (save_pretrained)")  # fmt: skip
    check_weight_files(model_dir)
    quantization = quantization_config(quantize, bf16=False)  # merged in float32 compute
    if task is not None:
        return load_model(model_dir, task, labels, labels_source="the adapter's labels",
                          quantization_config=quantization).eval()  # fmt: skip
    return _load_by_architecture(model_dir, quantization)


def _load_by_architecture(model_dir: Path, quantization: Any = None) -> nn.Module:
    import transformers

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
        extra = {} if quantization is None else {"quantization_config": quantization}
        return cls.from_pretrained(model_dir, local_files_only=True, **extra).eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{model_dir}: cannot load {cls.__name__}: {err}") from None


def adapter_task(
    folder: Path, task: str | None, stored: BaseModelInfo
) -> tuple[str | None, dict[str, int] | None]:
    """(task, labels) of the adapter in `folder`: --task, else the task and labels the adapter
    records (`stored`: PEFT's task_type, lorakit_id2label), else finetune's run.json beside
    the folder."""
    run = _read_run(folder.parent / RUN_FILE)
    task = task or stored.task or run.get("task")
    if task != "seq-cls":
        return task, None
    return task, stored.label_map or run.get("labels")


def base_folder(base: Path | None, stored: BaseModelInfo, adapter: Path) -> Path:
    """--base, else the base model the adapter records (a folder, or the "smollm2" alias).

    Raises:
        CheckpointError: no --base and the adapter records no base, or one not found here.
    """
    if base is not None:
        return base
    if stored.name_or_path is None:
        raise CheckpointError(f"{adapter} does not record its base model "
                              "(base_model_name_or_path); pass --base MODEL_DIR")  # fmt: skip
    if stored.name_or_path == SMOLLM2:
        return resolve_model(SMOLLM2)
    if not Path(stored.name_or_path).is_dir():
        raise CheckpointError(f"{adapter} records the base model {stored.name_or_path!r}, which "
                              "is not a folder here; pass --base MODEL_DIR")  # fmt: skip
    return Path(stored.name_or_path)


def base_quantization(folder: Path, quantize: Quantize | None) -> Quantize:
    """How the adapter's base was quantized in training: --quantized-base, else the
    `--quantize` that finetune's run.json beside `folder` records, else "none"."""
    if quantize is not None:
        return quantize
    return _read_run(folder.parent / RUN_FILE).get("quantize") or "none"


def _read_run(path: Path) -> dict[str, Any]:
    """The task, labels and --quantize of a finetune run.json; {} when there is none."""
    if not path.is_file():
        return {}
    run = read_json(path)
    task, labels = run.get("task"), run.get("labels")
    if task is not None and task not in TASKS:
        raise CheckpointError(f"{path}: task {task!r} is not one of {list(TASKS)}")
    options = run.get("options")
    quantize = options.get("quantize") if isinstance(options, dict) else None
    if quantize is not None and quantize not in get_args(Quantize):
        raise CheckpointError(f"{path}: options.quantize {quantize!r} is not one of "
                              f"{list(get_args(Quantize))}")  # fmt: skip
    valid = isinstance(labels, dict) and all(
        isinstance(k, str) and isinstance(v, int) for k, v in labels.items()
    )
    if labels is not None and not valid:
        raise CheckpointError(f"{path}: labels must map label names to class ids, got {labels!r}")
    return {"task": task, "labels": labels, "quantize": quantize}


def check_head_source(model: nn.Module, raw: dict[str, Any], base: Path, adapter: Path) -> None:
    """Refuse a classifier whose head neither the base nor the adapter holds (it is random)."""
    has_head = head_labels(read_model_config(base)) is not None
    if not has_head and not raw.get("modules_to_save"):
        raise CheckpointError(
            f"{adapter} holds no classification head (modules_to_save is empty) and {base} "
            f"has none either: the merged {type(model).__name__} would classify at random"
        )


def explain_bare_model(
    model: nn.Module, tensors: dict[str, Any], base: Path, adapter: Path
) -> None:
    """Raise when the adapter was trained on `model`'s class with a task head on top.

    A task model (BertForSequenceClassification) keeps the bare one under its
    `base_model_prefix` ("bert."), so its adapter's paths start with it and a bare model's
    paths do not: that, not other weights, is why such an adapter does not fit.
    """
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or hasattr(model, prefix):
        return  # a model with a task head, or one without a prefix
    if any(k.removeprefix(_PEFT_PREFIX).startswith(f"{prefix}.") for k in tensors):
        raise CheckpointError(
            f"{adapter} was trained on a model with a task head (its layers sit under "
            f"'{prefix}.') but {base / 'config.json'} names {type(model).__name__}, the bare "
            "model; pass --task seq-cls or --task causal-lm"
        )


def _save(model: nn.Module, base: Path, folder: Path) -> None:
    """Write the merged model and the base's side files to `folder`."""
    model.save_pretrained(folder)  # transformers writes safetensors
    for f in base.iterdir():
        side_file = f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES)
        if side_file and not (folder / f.name).exists():
            shutil.copy2(f, folder / f.name)


def merge_folder(
    base: Path | None,
    adapter: Path,
    out: Path,
    adapter_name: str = "default",
    allow_pickle: bool = False,
    task: str | None = None,
    quantize: Quantize | None = None,
) -> tuple[int, Path, Quantize]:
    """Write base + adapter, merged, to `out`; returns (layers merged, out, how the base was
    quantized). `base` None: the base model the adapter records. `quantize` None: as the
    adapter's run.json records (see the module docstring), else "none".

    Raises:
        CheckpointError: `out` exists and is not empty or cannot be written, base / adapter
            cannot be read, or the adapter does not fit the base (the message says why).
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out {out} exists and is not empty; pick a new folder")
    # Read and check the adapter first: it is small, the model is not.
    folder, raw, tensors, metadata = read_adapter(adapter, adapter_name, allow_pickle=allow_pickle)
    stored = read_base(raw, metadata, folder, _weights(folder))
    task, labels = adapter_task(folder, task, stored)
    quantize = base_quantization(folder, quantize)
    base = base_folder(base, stored, adapter)
    try:
        # made first, so an unwritable --out fails before the model loads; owner-only as ever
        with atomic_folder(out, replace=False, mode=0o700) as tmp:
            model = load_base(base, task, labels, quantize)
            if task == "seq-cls":
                check_head_source(model, raw, base, adapter)
            try:
                load_adapter(model, adapter, adapter_name, allow_pickle=allow_pickle)
            except CheckpointError:
                explain_bare_model(model, tensors, base, adapter)
                raise
            layers = len(list(lora_layers(model)))
            merge_and_unload(model)  # adapted quantized layers: dequant(W) + s B A
            if quantize != "none":
                from ..layers.dequantize import dequantize_model

                dequantize_model(model)  # the layers without an adapter
            _save(model, base, tmp)
    except OSError as err:
        raise CheckpointError(f"cannot write --out {out}: {err.strerror or err}") from None
    return layers, out, quantize


def _weights(folder: Path) -> Path:
    """The weights file `read_adapter` read (safetensors, else the legacy pickle)."""
    weights = folder / WEIGHTS_NAME
    return weights if weights.is_file() else folder / PICKLE_NAME


def run(args: argparse.Namespace) -> int:
    layers, out, quantize = merge_folder(
        None if args.base is None else Path(args.base),
        Path(args.adapter),
        Path(args.out),
        args.adapter_name,
        args.allow_pickle,
        args.task,
        args.quantized_base,
    )
    base = args.base or "its base"
    if quantize != "none":
        base = f"{base} (loaded as {quantize}, dequantized)"
    print(f"merged {args.adapter} into {layers} layers of {base} -> {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge an adapter into its base model and save a plain transformers folder",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--base", metavar="MODEL_DIR",
                        help="transformers model folder (config.json + weights); default: the "
                        "base the adapter records (a folder, or smollm2)")  # fmt: skip
    parser.add_argument("--adapter", required=True, metavar="PATH", help="adapter folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="new folder to write")
    parser.add_argument(
        "--task",
        choices=TASKS,
        help="the head to load the base with (default: the adapter's task_type, the run.json "
        "of `lorakit finetune` beside it, else the base config's architectures)",
    )
    parser.add_argument(
        "--quantized-base",
        choices=get_args(Quantize),
        help="the base was quantized in training (finetune --quantize): load it so, then "
        "dequantize, so the merged model gives what was trained (default: the run.json of "
        "`lorakit finetune` beside the adapter, else none)",
    )
    parser.add_argument(
        "--adapter-name", default="default", help="read PATH/NAME when it holds an adapter"
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="also read a legacy adapter_model.bin"
    )
    parser.set_defaults(func=run)
