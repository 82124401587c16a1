"""`finetune --init loftq`: the base's full-precision weights, read from its folder one at a
time, for `lorakit.loftq_init` on the quantized model (which holds only codes).

A weight is looked up by the model's module path; when the checkpoint was saved from the bare
model (BertModel: "encoder...") and the task model nests it ("bert.encoder..."), the path
without the model's `base_model_prefix` is tried too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from torch import Tensor


class FolderWeights(Mapping[str, Tensor]):
    """{parameter name: tensor} over the `*.safetensors` files of a model folder, lazily."""

    def __init__(self, folder: str | Path, prefix: str = "") -> None:
        from safetensors import safe_open

        self.prefix = f"{prefix}." if prefix else ""
        self.files: dict[str, Path] = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                self.files.update(dict.fromkeys(f.keys(), path))

    def _key(self, name: str) -> str:
        if name in self.files:
            return name
        bare = name.removeprefix(self.prefix) if self.prefix else name
        if bare in self.files:
            return bare
        raise KeyError(name)

    def __getitem__(self, name: str) -> Tensor:
        from safetensors import safe_open

        key = self._key(name)
        with safe_open(self.files[key], "pt") as f:
            return f.get_tensor(key)

    def __contains__(self, name: object) -> bool:
        try:
            self._key(str(name))
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)
