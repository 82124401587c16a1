"""Which adapters the server holds, which requests use each, and where runtime loads may read.

The engine keeps one `AdapterTable` under its lock: a name is usable when loaded and not
being unloaded; every submitted request holds its adapter until it finishes, so an unload
waits for the requests that use it and no request ever runs on a half-removed adapter.
"""

from __future__ import annotations

from collections import Counter
from os import PathLike
from pathlib import Path

from .errors import BadRequest, ModelNotFound


class AdapterTable:
    """name -> folder of each loaded adapter, with use counts and names being (un)loaded."""

    def __init__(self, base_id: str) -> None:
        self.base_id = base_id
        self.paths: dict[str, str] = {}
        self.in_use: Counter[str] = Counter()
        self.draining: set[str] = set()  # being unloaded: no new requests
        self.loading: set[str] = set()

    def resolve(self, model: str) -> str | None:
        """The adapter a request's `model` names; None for the base model.

        Raises:
            ModelNotFound: no such adapter, or it is being unloaded.
        """
        if model == self.base_id:
            return None
        if model in self.paths and model not in self.draining:
            return model
        state = " (it is being unloaded)" if model in self.draining else ""
        raise ModelNotFound(
            f"model {model!r} does not exist{state}; this server has {self.served()}"
        )

    def served(self) -> list[str]:
        return [self.base_id, *(n for n in self.paths if n not in self.draining)]

    def check_new_name(self, name: str) -> None:
        """Raise BadRequest when `name` cannot be given to a new adapter."""
        if not isinstance(name, str) or not name:
            raise BadRequest(f"lora_name must be a non-empty string, got {name!r}")
        if name == self.base_id:
            raise BadRequest(f"lora_name {name!r} is the base model's id; pick another name")
        if name in self.paths or name in self.loading:
            raise BadRequest(f"an adapter named {name!r} is already loaded; unload it first")


def folder_under(root: str | PathLike | None, path: str) -> Path:
    """`path` (absolute, or relative to `root`) resolved, refused unless inside `root`.

    Symbolic links are resolved first, so a link cannot lead out of `root`.

    Raises:
        BadRequest: no `root` was configured, or the folder lies outside it.
    """
    if root is None:
        raise BadRequest("runtime adapter loading needs --adapter-dir; none was given")
    base = Path(root).resolve()
    folder = (base / path).resolve()
    if folder != base and base not in folder.parents:
        raise BadRequest(
            f"lora_path {path!r} is outside the adapter folder {str(base)!r}; adapters load at "
            "run time only from folders under --adapter-dir"
        )
    return folder
