"""The JSON types of the adapter_config.json fields lorakit reads, checked before any is used,
so a malformed file is a CheckpointError naming the field, never a TypeError from deep inside."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..errors import CheckpointError


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: object) -> bool:
    return _int(v) or isinstance(v, float)


def _strings(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _optional(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: v is None or check(v)


def _mapping(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: isinstance(v, dict) and all(check(x) for x in v.values())


# field -> (what it must be, check); None counts as absent where PEFT writes null
FIELDS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "peft_type": ("a string", _optional(lambda v: isinstance(v, str))),
    "r": ("an integer", _optional(_int)),
    "lora_alpha": ("a number", _optional(_number)),
    "lora_dropout": ("a number", _optional(_number)),
    "target_modules": (
        "a string or a list of strings", _optional(lambda v: isinstance(v, str) or _strings(v))
    ),
    "exclude_modules": (
        "a string or a list of strings", _optional(lambda v: isinstance(v, str) or _strings(v))
    ),
    "modules_to_save": ("a list of strings", _optional(_strings)),
    "target_parameters": ("a list of strings", _optional(_strings)),
    "rank_pattern": ("an object of integers", _optional(_mapping(_int))),
    "alpha_pattern": ("an object of numbers", _optional(_mapping(_number))),
    "use_rslora": ("true or false", _optional(lambda v: isinstance(v, bool))),
    "use_dora": ("true or false", _optional(lambda v: isinstance(v, bool))),
    "lora_bias": ("true or false", _optional(lambda v: isinstance(v, bool))),
    "bias": ("a string", _optional(lambda v: isinstance(v, str))),
    "init_lora_weights": ("true, false or a string", lambda v: isinstance(v, (bool, str))),
    "task_type": ("a string", _optional(lambda v: isinstance(v, str))),
    "base_model_name_or_path": ("a string", _optional(lambda v: isinstance(v, str))),
}


def check_types(raw: Mapping[str, object], source: str) -> None:
    """Raise CheckpointError naming `source` and the first field of the wrong JSON type."""
    for key, (want, ok) in FIELDS.items():
        if key in raw and not ok(raw[key]):
            shown = repr(raw[key])
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise CheckpointError(f"{source}: {key} must be {want}, got {shown}")
