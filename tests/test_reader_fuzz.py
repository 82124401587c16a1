"""Fuzz the adapter reader: mutated adapter_config.json and safetensors files either load or
raise a LorakitError, and a failed load leaves the model exactly as it was."""

from __future__ import annotations

import json
import struct
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from torch import nn

import lorakit
from lorakit.checkpoint import read_adapter
from lorakit.cli.inspect import describe
from lorakit.errors import LorakitError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
KEYS = [f"base_model.model.{i}.lora_{f}.weight" for i in (0, 2) for f in "AB"]
SEED = 11


def _mlp() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _original() -> tuple[bytes, bytes]:
    """(config bytes, weights bytes) of a clean lorakit save."""
    model = _mlp()
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("0", "2")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.normal_()
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(model, tmp)
        return (Path(tmp) / CONFIG).read_bytes(), (Path(tmp) / WEIGHTS).read_bytes()


CONFIG_BYTES, WEIGHTS_BYTES = _original()


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _pack(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
DTYPES = ["F64", "F32", "F16", "BF16", "I32", "U8", "BOOL", "F8_E4M3", "C64", "", 3]
SIZES = st.integers(-2, 2**33) | st.sampled_from([0, 1, 2, 4, 8, 16])


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- mutations: each returns (config bytes, weights bytes) ------------------------------------
@st.composite
def flip_bytes(draw, which: str) -> tuple[bytes, bytes]:  # noqa: ANN001
    data = bytearray(CONFIG_BYTES if which == "config" else WEIGHTS_BYTES)
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    end = draw(st.integers(0, len(data)) | st.just(len(data)))
    data = bytes(data[:end])
    return (data, WEIGHTS_BYTES) if which == "config" else (CONFIG_BYTES, data)


@st.composite
def header_length(draw) -> tuple[bytes, bytes]:  # noqa: ANN001
    n = draw(st.integers(0, 2**64 - 1) | st.integers(0, len(WEIGHTS_BYTES)))
    return CONFIG_BYTES, struct.pack("<Q", n) + WEIGHTS_BYTES[8:]


@st.composite
def header_field(draw) -> tuple[bytes, bytes]:  # noqa: ANN001
    header, body = _split(WEIGHTS_BYTES)
    key = draw(st.sampled_from(KEYS))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    values = {
        "dtype": st.sampled_from(DTYPES) | JSON,
        "shape": st.lists(SIZES, max_size=4) | JSON,
        "data_offsets": st.lists(SIZES, min_size=2, max_size=2) | JSON,
    }
    header[key][field] = draw(values[field])
    if draw(st.booleans()):
        header[key.removeprefix("base_model.model.")] = dict(header[key])  # a duplicate
    return CONFIG_BYTES, _pack(header, body + b"\0" * draw(st.sampled_from([0, 0, 4, 8])))


@st.composite
def metadata_field(draw) -> tuple[bytes, bytes]:  # noqa: ANN001
    header, body = _split(WEIGHTS_BYTES)
    field = draw(st.sampled_from(["lorakit_config", "lorakit_base_shapes", "format", "new"]))
    value = draw(JSON.map(json.dumps) | st.text(max_size=8) | st.integers(0, 4).map(_deep_of))
    header["__metadata__"][field] = draw(st.sampled_from([value, value, json.loads("1")]))
    return CONFIG_BYTES, _pack(header, body)


def _deep_of(k: int) -> str:
    return _deep(10 ** (k % 4))


@st.composite
def tensors(draw) -> tuple[bytes, bytes]:  # noqa: ANN001
    """Real, well-formed files with the wrong content: dtypes, shapes, NaN / inf, duplicates."""
    header, body = _split(WEIGHTS_BYTES)
    from safetensors.torch import load

    values = load(WEIGHTS_BYTES)
    key = draw(st.sampled_from(KEYS))
    change = draw(st.sampled_from(["dtype", "shape", "nonfinite", "duplicate", "drop", "stray"]))
    if change == "dtype":
        dtype = draw(st.sampled_from([torch.float64, torch.bfloat16, torch.int32, torch.uint8]))
        values[key] = values[key].to(dtype)
    elif change == "shape":
        values[key] = torch.zeros(draw(st.lists(st.integers(0, 5), max_size=3)))
    elif change == "nonfinite":
        values[key].view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf")]))
    elif change == "duplicate":
        values[key.removeprefix("base_model.model.")] = values[key].clone()
    elif change == "drop":
        del values[key]
    else:
        values["base_model.model.stray"] = torch.ones(3)
    return CONFIG_BYTES, st_save(values, metadata=header["__metadata__"])


@st.composite
def config_field(draw) -> tuple[bytes, bytes]:  # noqa: ANN001
    config = json.loads(CONFIG_BYTES)
    fields = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "bias"]
    field = draw(st.sampled_from([*fields, "modules_to_save", "exclude_modules", "use_rslora"]))
    if draw(st.integers(0, 5)) == 0:
        config.pop(field, None)
    else:
        config[field] = draw(JSON)
    text = json.dumps(config)
    if draw(st.integers(0, 6)) == 0:
        text = text[:-1] + ', "deep": ' + _deep(draw(st.sampled_from([70, 2000]))) + "}"
    # the weights' copy of the config must go too, else it (rightly) wins over the file
    header, body = _split(WEIGHTS_BYTES)
    if draw(st.booleans()):
        del header["__metadata__"]["lorakit_config"]
    return text.encode(), _pack(header, body)


MUTATIONS = st.one_of(
    flip_bytes("config"),
    flip_bytes("weights"),
    header_length(),
    header_field(),
    metadata_field(),
    tensors(),
    config_field(),
)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=MUTATIONS)
def test_mutated_files_load_or_raise_a_lorakit_error(files: tuple[bytes, bytes]) -> None:
    config, weights = files
    model = _mlp()
    before = _state(model)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unknown keys, interrupted-save fallback
        (Path(tmp) / CONFIG).write_bytes(config)
        (Path(tmp) / WEIGHTS).write_bytes(weights)
        for read in (read_adapter, describe):
            try:
                read(tmp)
            except LorakitError:
                pass
        try:
            lorakit.load_adapter(model, tmp)
        except LorakitError:
            assert lorakit.adapter_names(model) == ()
            after = model.state_dict()
            assert after.keys() == before.keys()
            assert all(torch.equal(after[k], before[k]) for k in before)
            return
    assert lorakit.adapter_names(model) == ("default",)
    factors = [p for n, p in model.named_parameters() if ".lora." in n]
    assert factors and all(bool(torch.isfinite(p).all()) for p in factors)
