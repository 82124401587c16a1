"""The adapter reader and writer against hostile input and concurrent processes: concurrent
saves, malformed JSON and header metadata, NaN / inf, dtypes, duplicate keys, header-first
reads, file modes."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import struct
import warnings
from pathlib import Path

import pytest
import torch
from conftest import randomise_lora
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.adapter_registry import adapter_configs
from lorakit.checkpoint.safetensors_file import SafetensorsFile
from lorakit.cli import main
from lorakit.cli.inspect import describe
from lorakit.errors import CheckpointError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
KEY_A = "base_model.model.0.lora_A.weight"
KEY_B = "base_model.model.0.lora_B.weight"


def _mlp() -> nn.Module:
    torch.manual_seed(0)  # one base model: only the adapters differ between calls
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _adapted(rank: int = 4, value: float | None = None, dtype: torch.dtype = torch.float32):
    model = _mlp()
    lorakit.inject(model, lorakit.LoraConfig(rank=rank, targets=("0", "2"), dtype=dtype))
    if value is None:
        randomise_lora(model)
    else:
        with torch.no_grad():
            for p in _factors(model).values():
                p.fill_(value)
    return model


def _factors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".lora." in n}


def _unchanged(model: nn.Module) -> None:
    assert lorakit.adapter_names(model) == ()
    assert not list(lorakit.lora_layers(model))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    lorakit.save_adapter(_adapted(), folder)
    return folder


def _rewrite(folder: Path, tensors=None, **metadata: str) -> None:  # noqa: ANN001
    """Rewrite the weights with `tensors` (default: as they are) and extra header metadata."""
    path = folder / WEIGHTS
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = {**f.metadata(), **metadata}
    save_file(tensors if tensors is not None else load_file(path), path, metadata=meta)


def _edit_config(folder: Path, text: str) -> None:
    """Replace adapter_config.json with `text`, dropping the weights' copy of the config."""
    (folder / CONFIG).write_text(text)
    path = folder / WEIGHTS
    save_file(load_file(path), path, metadata={"format": "pt"})


# -- item 3: concurrent saves -----------------------------------------------------------------
def _writer(folder: str, rank: int, barrier, saves: int) -> None:  # noqa: ANN001
    model = _adapted(rank, float(rank))
    barrier.wait()
    for _ in range(saves):
        lorakit.save_adapter(model, folder)


def _reader(folder: str, barrier, reads: int, failures) -> None:  # noqa: ANN001
    barrier.wait()
    for _ in range(reads):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "interrupted save" fallback needed
            try:
                model = lorakit.load_adapter(_mlp(), folder)
            except Exception as err:  # noqa: BLE001 - reported to the parent
                failures.append(repr(err))
                continue
        rank = adapter_configs(model)["default"].rank
        values = {v for p in _factors(model).values() for v in p.unique().tolist()}
        if values != {float(rank)}:
            failures.append(f"rank {rank} with values {values}")


def _on_disk(folder: Path) -> tuple[int, set[int], set[float], int]:
    """(config r, A ranks, factor values, r of the weights' stored config) as PEFT sees them."""
    from safetensors import safe_open

    config = json.loads((folder / CONFIG).read_text())
    tensors = load_file(folder / WEIGHTS)
    with safe_open(folder / WEIGHTS, "pt") as f:
        stored = json.loads(f.metadata()["lorakit_config"])
    ranks = {t.shape[0] for k, t in tensors.items() if "lora_A" in k}
    values = {v for t in tensors.values() for v in t.unique().tolist()}
    return config["r"], ranks, values, stored["r"]


def test_concurrent_saves_leave_one_writers_adapter(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    failures = ctx.Manager().list()
    for round_ in range(12):
        folder = tmp_path / f"round{round_}"
        lorakit.save_adapter(_adapted(3, 3.0), folder)  # something to read from the start
        barrier = ctx.Barrier(3)
        procs = [ctx.Process(target=_writer, args=(str(folder), r, barrier, 3)) for r in (2, 4)]
        procs.append(ctx.Process(target=_reader, args=(str(folder), barrier, 6, failures)))
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0
        r, ranks, values, stored = _on_disk(folder)
        assert r in (2, 4) and ranks == {r} and values == {float(r)} and stored == r, round_
        assert not list(folder.glob("*.tmp")) and sorted(p.name for p in folder.iterdir()) == [
            CONFIG,
            WEIGHTS,
        ]
    assert list(failures) == []


def test_named_adapter_lock_leaves_default_alone(tmp_path: Path) -> None:
    model = _adapted(2, 2.0)
    lorakit.inject(model, lorakit.LoraConfig(rank=3, targets=("2",)), adapter_name="other")
    lorakit.save_adapter(model, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")  # a user's own file in the folder
    assert lorakit.save_adapter(model, tmp_path, adapter_name="other") == tmp_path / "other"
    assert (tmp_path / "notes.txt").read_text() == "mine"
    loaded = lorakit.load_adapter(_mlp(), tmp_path)
    lorakit.load_adapter(loaded, tmp_path, adapter_name="other")
    configs = adapter_configs(loaded)
    assert configs["other"].rank == 3 and configs["default"].rank == 2


# -- item 5: malformed metadata and config ----------------------------------------------------
DEEP = "[" * 2000 + "]" * 2000


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lorakit_config", "", r"metadata lorakit_config is not valid JSON"),
        ("lorakit_config", "[]", r"metadata lorakit_config must be a JSON object, got list"),
        ("lorakit_config", "null", r"metadata lorakit_config must be a JSON object, got NoneType"),
        ("lorakit_config", DEEP, r"metadata lorakit_config is nested too deeply"),
        ("lorakit_base_shapes", "[]", r"metadata lorakit_base_shapes must map layer paths"),
        ("lorakit_base_shapes", '{"0": 5}', r"metadata lorakit_base_shapes must map layer paths"),
        ("lorakit_base_shapes", '{"0": [true]}', r"metadata lorakit_base_shapes must map layer"),
    ],
)
def test_malformed_metadata(saved: Path, field: str, value: str, match: str) -> None:
    _rewrite(saved, **{field: value})
    model = _mlp()
    with pytest.raises(CheckpointError, match=rf"adapter_model\.safetensors {match}"):
        lorakit.load_adapter(model, saved)
    _unchanged(model)
    with pytest.raises(CheckpointError, match=match):
        lorakit.checkpoint.read_adapter(saved)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"r": 4, "target_modules": [["0"], "1"]}', r"target_modules must be a string or a list"),
        ('{"r": "4", "target_modules": ["0"]}', r"r must be an integer, got '4'"),
        ('{"r": true, "target_modules": ["0"]}', r"r must be an integer, got True"),
        ('{"r": 4, "target_modules": ["0"], "rank_pattern": []}', r"rank_pattern must be an obj"),
        ('{"r": 4, "target_modules": ["0"], "lora_alpha": "8"}', r"lora_alpha must be a number"),
        ('{"r": 4, "target_modules": "0", "modules_to_save": [1]}', r"modules_to_save must be"),
        ('{"r": 4, "target_modules": "0", "exclude_modules": 3}', r"exclude_modules must be"),
        ('{"r": 4, "target_modules": ["0"], "x": ' + DEEP + "}", r"nested too deeply"),
        ('{"r": 4, "target_modules": ["0"], "x": ' + "[" * 70 + "]" * 70 + "}", r"deeper than"),
        ('{"r": 1' + "0" * 5000 + ', "target_modules": ["0"]}', r"not valid JSON.*digits"),
        ("[]", r"must hold a JSON object, got list"),
    ],
)
def test_malformed_config(saved: Path, text: str, match: str) -> None:
    _edit_config(saved, text)
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unknown key "x"
        with pytest.raises(CheckpointError, match=rf"adapter_config\.json.*{match}"):
            lorakit.load_adapter(model, saved)
    _unchanged(model)


def _peft_folder(folder: Path, a: torch.Tensor, b: torch.Tensor) -> Path:
    folder.mkdir()
    (folder / CONFIG).write_text(json.dumps({"r": 4, "target_modules": ["0"]}))
    save_file({KEY_A: a, KEY_B: b}, folder / WEIGHTS)
    return folder


@pytest.mark.parametrize(
    ("a", "b"),
    [(torch.zeros(0, 8), torch.zeros(16, 0)), (torch.tensor(1.0), torch.zeros(16, 4))],
    ids=["rank-0", "0-d"],
)
def test_inspect_refuses_factors_without_a_rank(tmp_path: Path, a, b, capsys) -> None:  # noqa: ANN001
    folder = _peft_folder(tmp_path / "a", a, b)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS}: tensor '0\.lora_A\.weight' has shape"):
        describe(folder)
    assert main(["inspect", str(folder)]) == 2
    assert "a LoRA A factor is (rank >= 1" in capsys.readouterr().err
    model = _mlp()
    with pytest.raises(CheckpointError, match=r"does not fit this model"):
        lorakit.load_adapter(model, folder)
    _unchanged(model)


# -- item 7: NaN and inf -----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_tensors_refused_by_name(saved: Path, bad: float) -> None:
    tensors = load_file(saved / WEIGHTS)
    tensors[KEY_B][1, 2] = bad
    _rewrite(saved, tensors)
    model = _mlp()
    with pytest.raises(CheckpointError, match=rf"NaN or inf in 1 tensor\(s\): '{KEY_B}'"):
        lorakit.load_adapter(model, saved)
    _unchanged(model)
    lorakit.load_adapter(model, saved, allow_nonfinite=True)  # the explicit opt-out
    got = model[0].lora["default"].lora_B[1, 2].item()
    assert got == bad or (bad != bad and got != got)


# -- item 8: dtypes ------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_load_keeps_the_files_dtype_bitwise(tmp_path: Path, dtype: torch.dtype) -> None:
    model = _adapted(dtype=dtype)
    lorakit.save_adapter(model, tmp_path)
    assert {t.dtype for t in load_file(tmp_path / WEIGHTS).values()} == {dtype}
    loaded = lorakit.load_adapter(_mlp(), tmp_path)
    want, got = _factors(model), _factors(loaded)
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].dtype == dtype and torch.equal(_bits(got[name]), _bits(want[name]))
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    asked = lorakit.load_adapter(_mlp(), tmp_path, dtype=torch.float64)  # unless asked otherwise
    assert {p.dtype for p in _factors(asked).values()} == {torch.float64}


def test_mixed_factor_dtypes_load_in_the_wider(saved: Path) -> None:
    tensors = load_file(saved / WEIGHTS)
    tensors[KEY_A] = tensors[KEY_A].to(torch.bfloat16)
    tensors[KEY_B] = tensors[KEY_B].to(torch.float16)
    _rewrite(saved, tensors)
    loaded = lorakit.load_adapter(_mlp(), saved)
    assert {p.dtype for p in _factors(loaded).values()} == {torch.float32}


# -- item 11: duplicate keys, header first -----------------------------------------------------
def test_duplicate_keys_refused_naming_both(saved: Path) -> None:
    tensors = load_file(saved / WEIGHTS)
    tensors["0.lora_A.weight"] = tensors[KEY_A].clone()
    _rewrite(saved, tensors)
    model = _mlp()
    with pytest.raises(CheckpointError, match=r"holds one tensor twice: '\S+' and '\S+'") as err:
        lorakit.load_adapter(model, saved)
    assert set(re.findall(r"'(\S+)'", str(err.value))) == {KEY_A, "0.lora_A.weight"}
    _unchanged(model)


def test_no_tensor_is_read_before_the_header_passes(saved: Path, monkeypatch) -> None:
    tensors = load_file(saved / WEIGHTS)
    tensors["base_model.model.stray"] = torch.zeros(1000, 1000)
    _rewrite(saved, tensors)
    read: list[str] = []
    real = SafetensorsFile._tensor
    monkeypatch.setattr(
        SafetensorsFile, "_tensor", lambda self, key, e: read.append(key) or real(self, key, e)
    )
    model = _mlp()
    with pytest.raises(CheckpointError, match=r"unexpected 'base_model\.model\.stray'"):
        lorakit.load_adapter(model, saved)
    assert read == []
    _unchanged(model)


def _raw(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


_F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_raw({"a": _F32x2}, b"\0" * 4), r"truncated or padded: tensors need"),
        (_raw({"a": _F32x2}, b"\0" * 12), r"truncated or padded"),
        (_raw({"a": {**_F32x2, "data_offsets": [0, 12]}}, b"\0" * 12), r"hold 12 bytes, .* need 8"),
        (_raw({"a": {**_F32x2, "shape": [2**40], "data_offsets": [0, 2**42]}}), r"need \d+ bytes"),
        (_raw({"a": {**_F32x2, "dtype": "C64"}}, b"\0" * 8), r"dtype 'C64' is not one lorakit"),
        (_raw({"a": {**_F32x2, "dtype": []}}, b"\0" * 8), r"dtype \[\] is not one lorakit"),
        (_raw({"a": {**_F32x2, "shape": [-2]}}, b"\0" * 8), r"shape \[-2\] is not a list"),
        (_raw({"a": {**_F32x2, "data_offsets": [8, 0]}}, b"\0" * 8), r"is not \[begin, end\]"),
        (_raw({"a": _F32x2, "b": _F32x2}, b"\0" * 8), r"overlaps another"),
        (_raw({"a": {**_F32x2, "data_offsets": [4, 12]}}, b"\0" * 12), r"leaves a gap"),
        (_raw({"__metadata__": {"x": 1}}), r"__metadata__ must map strings to strings"),
        (_raw({"a": 1}), r"tensor 'a': entry is not an object"),
        (_raw([1]), r"the header is a JSON list"),
        (_raw({}, length=2**62), r"header length \d+ exceeds the file size"),
        (b"\x0d\0\0\0\0\0\0\0" + b'{"a":1,"a":2}', r"key 'a' appears twice"),
        (_raw({"x": {"y": {"z": {}}}} | {"d": json.loads("[" * 70 + "]" * 70)}), r"deeper"),
    ],
)
def test_header_checked_against_the_file(tmp_path: Path, data: bytes, match: str) -> None:
    path = tmp_path / WEIGHTS
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS} is not a readable safetensors.*{match}"):
        SafetensorsFile(path)


# -- item 16: file modes -------------------------------------------------------------------------
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        lorakit.save_adapter(_adapted(), tmp_path / "a")
    finally:
        os.umask(old)
    for name in (CONFIG, WEIGHTS):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == mode, name
