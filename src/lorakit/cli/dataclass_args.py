"""Command-line flags built from a dataclass's fields (see `lorakit.train.options.option`).

A field `max_length: int` becomes `--max-length`, typed by its annotation; a `Literal` gives
the flag's choices, a `bool` a `store_true` switch. The help and the `--help` group come from
the field's metadata, so the dataclass is the one place that lists the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


def flag(name: str) -> str:
    """The flag of field `name`: `eval_file` -> `--eval-file`."""
    return "--" + name.replace("_", "-")


def without_none(hint: Any) -> Any:
    """`X` for an annotation `X | None`; any other annotation as it is."""
    if get_origin(hint) in (Union, types.UnionType):
        (inner,) = (arg for arg in get_args(hint) if arg is not type(None))
        return inner
    return hint


def literal_choices(hint: Any) -> tuple[Any, ...] | None:
    """The values of a `Literal` annotation (also inside `| None`); None for other types."""
    hint = without_none(hint)
    return get_args(hint) if get_origin(hint) is Literal else None


def argument(field: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """The `add_argument` keywords of one field: type or choices, default, help."""
    help, shown = field.metadata["help"], field.metadata["shown_default"]
    if hint is bool:
        assert field.default is False, f"{field.name}: a store_true flag needs default False"
        return {"action": "store_true", "help": help}
    # Every help names its default once: the value, or words for a default that is a
    # behaviour (argparse alone would print "(default: None)").
    assert field.default is not None or shown, f"{field.name}: a None default needs words"
    kwargs: dict[str, Any] = {"default": field.default}
    choices = literal_choices(hint)
    if choices is not None:
        kwargs["choices"] = choices
    elif without_none(hint) in (int, float):
        kwargs["type"] = without_none(hint)
    kwargs["help"] = f"{help} (default: {shown or '%(default)s'})".lstrip()
    return kwargs


def add_arguments(group: argparse._ArgumentGroup, cls: type) -> None:
    """Add a flag to `group` for every field of dataclass `cls` whose metadata names it."""
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.metadata["group"] == group.title:
            group.add_argument(flag(field.name), **argument(field, hints[field.name]))


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """The `cls` instance that parsed arguments describe, one field a flag."""
    return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})
