"""A safetensors file read header first: every key, dtype, shape and byte range is checked
against the file size before one tensor byte is read, and only the tensors asked for are read.

The file stays open from the header to the last tensor, so a save renaming a new file into
place meanwhile cannot mix two files' bytes. Layout (safetensors spec): 8-byte little-endian
header length n, n bytes of JSON {key: {dtype, shape, data_offsets: [begin, end]}, optional
"__metadata__": {str: str}}, then the data, each tensor's bytes exactly where its offsets say
and no gaps.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError
from .safe_json import parse_json

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One tensor of the header: dtype, shape, and its byte range [start, end) in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice in the header")
        seen[key] = value
    return seen


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SafetensorsFile:
    """An open safetensors file whose header passed every check; use as a context manager.

    Raises:
        CheckpointError: missing file or any inconsistency, naming the file and the tensor.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._f = open(path, "rb")  # noqa: SIM115 - closed by close() / __exit__
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist") from None
        except OSError as err:
            raise CheckpointError(f"{path} cannot be read: {err}") from None
        try:
            self.entries, self.metadata = self._read_header()
        except BaseException:
            self._f.close()
            raise

    def _fail(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a readable safetensors file: {why}")

    def _read_header(self) -> tuple[dict[str, Entry], dict[str, str]]:
        size = self._f.seek(0, 2)
        self._f.seek(0)
        head = self._f.read(8)
        if len(head) < 8:
            raise self._fail("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise self._fail(f"header length {n} exceeds the file size {size}")
        text = self._f.read(n)
        try:
            header = parse_json(text, f"{self.path} header", _no_duplicates)
        except CheckpointError as err:
            raise self._fail(str(err)) from None
        if not isinstance(header, dict):
            raise self._fail(f"the header is a JSON {type(header).__name__}, not an object")
        metadata = self._metadata(header.pop("__metadata__", None))
        entries = {key: self._entry(key, value, 8 + n) for key, value in header.items()}
        self._check_layout(entries, 8 + n, size)
        return entries, metadata

    def _metadata(self, value: object) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self._fail("__metadata__ must map strings to strings")
        return value

    def _entry(self, key: str, value: object, base: int) -> Entry:
        if not isinstance(value, dict):
            raise self._fail(f"tensor {key!r}: entry is not an object")
        dtype, shape, offsets = (value.get(k) for k in ("dtype", "shape", "data_offsets"))
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._fail(f"tensor {key!r}: dtype {dtype!r} is not one lorakit reads")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._fail(f"tensor {key!r}: shape {shape!r} is not a list of sizes")
        ok = isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
        if not ok or not 0 <= offsets[0] <= offsets[1]:
            raise self._fail(f"tensor {key!r}: data_offsets {offsets!r} is not [begin, end]")
        need = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != need:
            raise self._fail(
                f"tensor {key!r}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                f"its dtype and shape need {need}"
            )
        return Entry(DTYPES[dtype], tuple(shape), base + offsets[0], base + offsets[1])

    def _check_layout(self, entries: dict[str, Entry], base: int, size: int) -> None:
        """Tensors tile the data section exactly: no overlap, no gap, nothing past the end."""
        at = base
        for key, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
            if e.start != at:
                why = "overlaps another" if e.start < at else "leaves a gap before it"
                raise self._fail(f"tensor {key!r} {why} (byte {e.start - base})")
            at = e.end
        if at != size:
            raise self._fail(f"truncated or padded: tensors need {at} bytes, the file has {size}")

    def read(self, keys: list[str]) -> dict[str, Tensor]:
        """The tensors `keys` (all from the header), each read straight into its own buffer."""
        return {key: self._tensor(key, self.entries[key]) for key in keys}

    def _tensor(self, key: str, e: Entry) -> Tensor:
        if e.end == e.start:
            return torch.empty(e.shape, dtype=e.dtype)
        buffer = bytearray(e.end - e.start)
        self._f.seek(e.start)
        if self._f.readinto(buffer) != len(buffer):
            raise self._fail(f"tensor {key!r}: the file ended early")
        tensor = torch.frombuffer(buffer, dtype=e.dtype).reshape(e.shape)
        # safetensors stores little-endian; a big-endian host must swap bytes
        return tensor if sys.byteorder == "little" else _byteswap(tensor)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _byteswap(tensor: Tensor) -> Tensor:  # pragma: no cover - big-endian hosts only
    size = tensor.element_size()
    raw = tensor.contiguous().view(torch.uint8).reshape(-1, size).flip(1)
    return raw.contiguous().view(tensor.dtype).reshape(tensor.shape)
