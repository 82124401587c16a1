"""Command-line flags built from a dataclass's fields (see `lorakit.train.options.option`).

A field `max_length: int` becomes `--max-length`, typed by its annotation; a `Literal` gives
the flag's choices, a `bool` a switch (`--flag`, or `--flag/--no-flag` when it defaults to
True). The help and the `--help` group come from the field's metadata, so the dataclass is the
one place that lists the options. A flag not given leaves no attribute in the parsed
namespace, so `from_args` can tell what the user said from a default (a recipe's defaults sit
between the two).
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
        action = "store_true" if field.default is False else argparse.BooleanOptionalAction
        return {"action": action, "default": argparse.SUPPRESS, "help": help}
    # Every help names its default once: the value, or words for a default that is a
    # behaviour (argparse alone would print "(default: None)").
    assert field.default is not None or shown, f"{field.name}: a None default needs words"
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS}
    choices = literal_choices(hint)
    if choices is not None:
        kwargs["choices"] = choices
    elif without_none(hint) in (int, float):
        kwargs["type"] = without_none(hint)
    kwargs["help"] = f"{help} (default: {shown or field.default})".lstrip()
    return kwargs


def add_arguments(group: argparse._ArgumentGroup, cls: type) -> None:
    """Add a flag to `group` for every field of dataclass `cls` whose metadata names it."""
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.metadata["group"] == group.title:
            group.add_argument(flag(field.name), **argument(field, hints[field.name]))


def given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of dataclass `cls` whose flags the parsed arguments hold."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def from_args(cls: type, args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> Any:
    """The `cls` instance that parsed arguments describe: each flag given sets its field, else
    `defaults` (e.g. a recipe's) does, else the field's own default."""
    return cls(**{**(defaults or {}), **given(cls, args)})
