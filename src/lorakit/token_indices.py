"""`LoraConfig.trainable_token_indices` (PEFT's name): which rows of an embedding train.

Either a list of token ids, for the model's input embedding, or {embedding module name: ids}.
This module checks the value alone (what a config can know); whether the ids fit the
embedding, and which module a name selects, is checked against the model when an adapter is
added (`lorakit.token_targets`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from .errors import ConfigError

OPTION = "trainable_token_indices"
TokenIndices = tuple[int, ...] | dict[str, tuple[int, ...]] | None


def check_token_indices(value: object) -> TokenIndices:
    """`value` as a tuple of ids, or {module name: tuple of ids}, or None (off).

    Raises:
        ConfigError: not a list of ints nor a mapping of names to such lists, a negative or
            repeated id, an empty list; the message names the option and the value.
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        if not value:
            raise ConfigError(f"{OPTION} must name at least one embedding module, got {{}}")
        checked = {}
        for name, ids in value.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{OPTION} keys must be embedding module names, got {name!r}")
            checked[name] = _ids(ids, f"{OPTION}[{name!r}]")
        return checked
    return _ids(value, OPTION)


def _ids(value: object, option: str) -> tuple[int, ...]:
    """A non-empty list of distinct non-negative ints, as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(
            f"{option} must be a list of token ids (or a dict of module name -> list), "
            f"got {value!r}"
        )
    ids = list(value)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int)]
    if bad:
        raise ConfigError(f"{option} must hold integer token ids, got {bad[0]!r} in {ids!r}")
    if not ids:
        raise ConfigError(f"{option} must hold at least one token id, got []")
    negative = [i for i in ids if i < 0]
    if negative:
        raise ConfigError(f"{option} must hold token ids >= 0, got {negative[0]} in {ids!r}")
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        raise ConfigError(f"{option} must not repeat a token id, got {repeated} twice in {ids!r}")
    return tuple(ids)


def check_ids_fit(ids: tuple[int, ...], num_embeddings: int, option: str, path: str) -> None:
    """Refuse ids past the end of the embedding at `path` (`num_embeddings` rows)."""
    past = [i for i in ids if i >= num_embeddings]
    if past:
        raise ConfigError(
            f"{option}: token id {past[0]} is out of range for {path!r}, which has "
            f"{num_embeddings} rows (ids 0..{num_embeddings - 1})"
        )
