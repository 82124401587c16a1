"""Hugging Face PEFT's adapter format: adapter_config.json keys and tensor key names.

Keys (the adapter name never appears; `base_model.model.` is optional when reading):

    <path>.lora_A.weight (r, in, *k)      <path>.lora_B.weight (out, r, *1)   Linear, Conv1D, ConvNd
    <path>.lora_embedding_A (r, vocab)    <path>.lora_embedding_B (dim, r)     Embedding
    <path>.lora_magnitude_vector (out,)   DoRA's magnitude (use_dora), any layer type
    <path>.lora_B.bias (out,)             B's bias (lora_bias), Linear, Conv1D, ConvNd
    <path>.token_adapter.trainable_tokens_delta (n, dim)   the trained rows of an embedding
                                          (trainable_token_indices; a tied lm_head: none)

On a conv with groups g > 1 `lora_B.weight` is (out, r / g, *1) (PEFT's grouped B).
    <path>.base_layer.bias                bias of an adapted layer (bias "lora_only" / "all")
    <path>.<param>                        other biases ("all"), modules_to_save tensors

With `bias="all"` PEFT also writes a modules_to_save layer's biases under its wrapper's
names: `<path>.modules_to_save.bias` (the trained copy, again) and `<path>.original_module.bias`
(the original, which its forward never uses). Reading skips both (`wrapper_copies`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

from ..config import LoraConfig
from ..errors import CheckpointError
from ..names import name_matches
from .schema import check_types

PREFIX = "base_model.model."

# Every field of peft.LoraConfig (0.21); any other key in a config file draws a warning.
PEFT_KEYS = frozenset(
    """alora_invocation_tokens alpha_pattern arrow_config auto_mapping base_model_name_or_path
    bias corda_config ensure_weight_tying eva_config exclude_modules fan_in_fan_out
    inference_mode init_lora_weights kasa_config layer_replication layers_pattern
    layers_to_transform loftq_config lora_alpha lora_bias lora_dropout lora_ga_config
    megatron_config megatron_core modules_to_save monteclora_config peft_type peft_version
    qalora_group_size r rank_pattern revision runtime_config target_modules target_parameters
    task_type trainable_token_indices use_bdlora use_dora use_qalora use_rslora
    velora_config""".split()
)
# PEFT features whose tensors or forward lorakit does not reproduce: refused when switched on.
UNSUPPORTED = (
    "layers_to_transform",
    "layer_replication",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "megatron_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
    "lora_ga_config",
    "corda_config",
    "loftq_config",
)
# Inits that rewrite the base weights: the saved tensors only fit that rewritten base.
_BASE_CHANGING_INIT = re.compile(r"pissa.*|olora|corda|loftq|lora[-_]ga")
# Inits lorakit replays at load as PEFT does (PiSSA / OLoRA rewrite the base to the residual
# again; MiCA keeps B frozen); the file's tensors then overwrite A and B.
_REPLAYED_PISSA = re.compile(r"pissa(_niter_\d+)?")


def _replayed_init(init: object) -> str | None:
    """The lorakit init a file's `init_lora_weights` is loaded with when it must be replayed
    (PEFT's test: "pissa..." as written, "olora" / "mica" in any case), else None."""
    if not isinstance(init, str):
        return None
    if init.lower() in ("olora", "mica"):
        return init.lower()
    return init if _REPLAYED_PISSA.fullmatch(init) else None


def to_peft(
    config: LoraConfig,
    target_modules: str | list[str],
    fan_in_fan_out: bool,
    base_model_name_or_path: str | None,
) -> dict[str, object]:
    """The adapter_config.json of `config`, with exactly the keys PEFT documents.

    `target_modules` is what the caller worked out matches exactly the adapted layers.
    """
    return _tokens_field(config) | {
        "peft_type": "LORA",
        "r": config.rank,
        "lora_alpha": _number(config.alpha),
        "target_modules": target_modules,
        "lora_dropout": config.dropout,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": {k: _number(v) for k, v in config.alpha_pattern.items()},
        "modules_to_save": list(config.modules_to_save) or None,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True if config.init in ("kaiming", "zeros") else config.init,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": None,
    } | ({"target_parameters": list(config.target_parameters)} if config.target_parameters else {})


def _tokens_field(config: LoraConfig) -> dict[str, object]:
    """PEFT's `trainable_token_indices` as the user gave it (a list, or a dict of lists)."""
    tokens = config.trainable_token_indices
    if tokens is None:
        return {}
    if isinstance(tokens, Mapping):
        return {"trainable_token_indices": {name: list(ids) for name, ids in tokens.items()}}
    return {"trainable_token_indices": list(tokens)}


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _off(value: object) -> bool:
    return value is None or value is False or value == {} or value == []


def from_peft(raw: Mapping[str, object], source: str) -> LoraConfig:
    """Translate a PEFT adapter_config.json (dict) into a LoraConfig for loading.

    Raises:
        CheckpointError: not a LoRA config, a required key is missing, a PEFT feature lorakit
            does not reproduce is on, or a value is invalid; the message names file and key.
    Warns:
        UserWarning: for keys that are not PEFT LoraConfig fields (they are ignored).
    """
    unknown = sorted(set(raw) - PEFT_KEYS)
    if unknown:
        warnings.warn(f"{source}: unknown keys {unknown} are ignored", UserWarning, stacklevel=3)
    check_types(raw, source)
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{source}: peft_type is {raw['peft_type']!r}; lorakit reads LORA")
    for key in UNSUPPORTED:
        if not _off(raw.get(key)):
            raise CheckpointError(
                f"{source}: {key}={raw[key]!r} is a PEFT feature lorakit does not support"
            )
    init = raw.get("init_lora_weights", True)
    replayed = _replayed_init(init)
    if replayed is None and isinstance(init, str) and _BASE_CHANGING_INIT.fullmatch(init):
        raise CheckpointError(
            f"{source}: init_lora_weights={init!r} rewrites the base weights; convert the "
            "adapter to plain LoRA with PEFT first"
        )
    parameters = raw.get("target_parameters") or ()
    for key in ("r", "target_modules"):
        if raw.get(key) is None and not (key == "target_modules" and parameters):
            raise CheckpointError(f"{source}: {key!r} is missing")
    targets = raw.get("target_modules") or ()
    if isinstance(targets, list):
        targets = tuple(dict.fromkeys(targets))  # PEFT writes sets as lists, maybe repeated
    saved = raw.get("modules_to_save") or ()
    tokens = raw.get("trainable_token_indices")
    try:
        return LoraConfig(
            rank=raw["r"],
            alpha=raw.get("lora_alpha", 8),
            dropout=raw.get("lora_dropout", 0.0) or 0.0,
            targets=targets,
            exclude=_exclude(raw.get("exclude_modules")),
            rank_pattern=raw.get("rank_pattern") or {},
            alpha_pattern=raw.get("alpha_pattern") or {},
            use_rslora=bool(raw.get("use_rslora", False)),
            use_dora=bool(raw.get("use_dora", False)),
            lora_bias=bool(raw.get("lora_bias", False)),
            bias=raw.get("bias", "none"),
            modules_to_save=tuple(dict.fromkeys(saved)),
            init=replayed or "zeros",  # the file's tensors overwrite both factors
            target_parameters=tuple(parameters),
            trainable_token_indices=None if _off(tokens) else tokens,
        )
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{source}: {err}") from None


def _exclude(value: object) -> str | tuple[str, ...]:
    if value is None:
        return ()
    return value if isinstance(value, str) else tuple(value)


def lora_keys(path: str, embedding: bool) -> tuple[str, str]:
    """PEFT's keys of A and B for the layer at `path`."""
    if embedding:
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def lora_bias_key(path: str) -> str:
    """PEFT's key of B's bias (`lora_bias`) for the layer at `path`."""
    return f"{PREFIX}{path}.lora_B.bias"


def token_key(path: str) -> str:
    """PEFT's key of the trained rows (`trainable_token_indices`) of the embedding at `path`."""
    return f"{PREFIX}{path}.token_adapter.trainable_tokens_delta"


def magnitude_key(path: str) -> str:
    """PEFT's key of DoRA's magnitude vector for the layer at `path` (no `.weight` suffix)."""
    return f"{PREFIX}{path}.lora_magnitude_vector"


def param_key(path: str, param: str, adapted: bool) -> str:
    """PEFT's key of a full tensor: `.base_layer.` in front of an adapted layer's own tensors."""
    return f"{PREFIX}{path}.{'base_layer.' if adapted else ''}{param}"


def with_prefix(key: str) -> str:
    """PEFT accepts keys with or without `base_model.model.`; lorakit compares with it."""
    return key if key.startswith(PREFIX) else PREFIX + key


_WRAPPER_KEY = re.compile(r"(.+)\.(modules_to_save|original_module)\.([^.]+)")


def wrapper_copies(keys: set[str], config: LoraConfig) -> set[str]:
    """The keys (with PREFIX) among `keys` that PEFT writes under a modules_to_save layer's
    wrapper besides the layer's own tensors: `<path>.original_module.<p>` and, when
    `<path>.<p>` is there too, `<path>.modules_to_save.<p>`. Loading leaves them unread."""
    copies = set()
    for key in keys:
        found = _WRAPPER_KEY.fullmatch(key)
        if found is None:
            continue
        path, kind, param = found.groups()
        if not name_matches(path.removeprefix(PREFIX), config.modules_to_save):
            continue
        if kind == "original_module" or f"{path}.{param}" in keys:
            copies.add(key)
    return copies
