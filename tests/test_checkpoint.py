"""save_adapter / load_adapter: round trips, atomic writes, and every kind of bad input."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import typing
import warnings
from pathlib import Path

import pytest
import torch
from conftest import LAYER_CASES, MODEL_CASES, ModelCase, randomise_lora, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.adapter_registry import adapter_configs
from lorakit.checkpoint import LoadOptions, fingerprint, load_adapter, read_adapter
from lorakit.errors import AdapterError, CheckpointError

PEFT_CONFIG_KEYS = {
    "peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora",
    "use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out",
    "init_lora_weights", "inference_mode", "base_model_name_or_path", "task_type",
}  # fmt: skip


class Holder(nn.Module):
    """Wraps one layer so it has a module path ("layer") like a real model's layers."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _adapted(case: ModelCase, config: lorakit.LoraConfig | None = None) -> nn.Module:
    model = case.make()
    lorakit.inject(model, config or lorakit.LoraConfig(rank=4, targets=case.targets))
    randomise_lora(model)
    return model


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def test_round_trip_each_layer_type(case, tmp_path: Path) -> None:
    model = Holder(case.make())
    lorakit.inject(model, lorakit.LoraConfig(rank=3, alpha=5, targets=("layer",)))
    randomise_lora(model)
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.load_adapter(Holder(case.make()), tmp_path)
    x = case.make_input()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert model.layer.lora["default"].lora_A.equal(loaded.layer.lora["default"].lora_A)


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.id for c in MODEL_CASES])
def test_round_trip_models(case: ModelCase, tmp_path: Path) -> None:
    model = _adapted(case)
    lorakit.save_adapter(model, tmp_path)
    base = case.make()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a clean save loads without a word
        loaded = lorakit.from_pretrained(base, tmp_path)
    torch.testing.assert_close(case.run(loaded), case.run(model), rtol=0, atol=0)
    assert lorakit.adapter_names(loaded) == ("default",)


def test_from_pretrained_takes_load_adapters_options(tmp_path: Path) -> None:
    # written once: LoadOptions names exactly load_adapter's keyword options, with their types
    params = inspect.signature(load_adapter).parameters.values()
    keyword = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    hints = typing.get_type_hints(load_adapter)
    assert typing.get_type_hints(LoadOptions) == {n: hints[n] for n in keyword}
    model = _adapted(MODEL_CASES[0])
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.from_pretrained(MODEL_CASES[0].make(), tmp_path, dtype=torch.float64)
    assert {p.dtype for n, p in loaded.named_parameters() if ".lora." in n} == {torch.float64}
    with pytest.raises(TypeError, match="allow_pickles"):
        lorakit.from_pretrained(MODEL_CASES[0].make(), tmp_path, allow_pickles=True)


def test_files_follow_peft_layout(tmp_path: Path) -> None:
    model = _adapted(MODEL_CASES[1])  # llama, q_proj + v_proj
    folder = lorakit.save_adapter(model, tmp_path)
    assert folder == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config) == PEFT_CONFIG_KEYS
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["target_modules"] == ["q_proj", "v_proj"]
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        shape = f.get_slice("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        assert tuple(shape.get_shape()) == (4, 32)
    assert meta["format"] == "pt" and meta["lorakit_version"] == lorakit.__version__
    shapes = json.loads(meta["lorakit_base_shapes"])
    assert meta["lorakit_base_fingerprint"] == fingerprint(shapes)
    assert shapes["model.layers.0.self_attn.q_proj"] == [32, 32]
    assert len(keys) == 2 * 2 * 2 and all(".lora_" in k for k in keys)
    assert not any("default" in k for k in keys)  # the adapter's name never appears in a key


def test_named_adapters_go_to_subfolders(tmp_path: Path) -> None:
    case = MODEL_CASES[1]
    model = _adapted(case)
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("k_proj",)), adapter_name="other")
    randomise_lora(model, seed=7)
    lorakit.save_adapter(model, tmp_path)
    assert lorakit.save_adapter(model, tmp_path, adapter_name="other") == tmp_path / "other"
    loaded = case.make()
    lorakit.load_adapter(loaded, tmp_path)
    lorakit.load_adapter(loaded, tmp_path, adapter_name="other")
    for names in ("default", "other", ("default", "other")):
        lorakit.set_active(model, names)
        lorakit.set_active(loaded, names)
        torch.testing.assert_close(case.run(loaded), case.run(model), rtol=0, atol=0)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_and_modules_to_save_round_trip(bias: str, tmp_path: Path) -> None:
    case = MODEL_CASES[3]  # bert
    config = lorakit.LoraConfig(
        rank=4, targets=("query",), bias=bias, modules_to_save=("classifier",)
    )
    model = _adapted(case, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn_like(p))  # what training would have changed
    lorakit.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    has_other_bias = "base_model.model.bert.encoder.layer.0.attention.self.key.bias" in keys
    assert has_other_bias == (bias == "all")
    loaded = lorakit.from_pretrained(case.make(), tmp_path)
    torch.testing.assert_close(case.run(loaded), case.run(model), rtol=0, atol=0)


# -- atomic saves ---------------------------------------------------------------------------
_CHILD = """
import os, signal, sys, torch, lorakit
import lorakit.checkpoint.atomic as atomic

mode, folder = sys.argv[1], sys.argv[2]
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
lorakit.inject(model, lorakit.LoraConfig(rank=int(sys.argv[3]), targets=("0", "2")))
for p in model.parameters():
    if p.requires_grad:
        torch.nn.init.constant_(p, 2.0)
if mode == "mid-write":  # die with half of the new weights file written
    def half(f, data):
        f.write(data[: len(data) // 2]); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
    atomic.write_bytes = half
elif mode == "between-files":  # die after the weights are in place, before the config
    real, calls = os.replace, []
    def replace(src, dst):
        real(src, dst); calls.append(dst)
        if len(calls) == 1: os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
elif mode == "loop":  # save versions 1, 2, 3, ... until killed from outside
    version = 0
    while True:
        version += 1
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.constant_(p, float(version))
        lorakit.save_adapter(model, folder)
        print(version, flush=True)
lorakit.save_adapter(model, folder)
"""


def _child(tmp_path: Path, *args: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_CHILD))
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _previous(folder: Path) -> nn.Module:
    model = _mlp()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=("0", "2")))
    randomise_lora(model)
    lorakit.save_adapter(model, folder)
    return model


def _lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".lora." in n}


def _lora_values(model: nn.Module) -> set[float]:
    return {v for p in _lora_params(model).values() for v in p.unique().tolist()}


@pytest.mark.parametrize("mode", ["mid-write", "between-files"])
def test_killed_save_leaves_a_whole_adapter(mode: str, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    before = _previous(folder)
    child = _child(tmp_path, mode, str(folder), "4" if mode == "mid-write" else "2")
    assert child.wait(timeout=120) == -signal.SIGKILL
    child.stdout.close()
    if mode == "mid-write":  # the old files untouched, only a stray temporary file
        loaded = lorakit.from_pretrained(_mlp(), folder)
        want, got = _lora_params(before), _lora_params(loaded)
        assert want.keys() == got.keys() and all(want[k].equal(got[k]) for k in want)
        assert any(p.name.endswith(".tmp") for p in folder.iterdir())
    else:  # new weights (rank 2) with the old config (rank 4): the weights' config wins
        with pytest.warns(UserWarning, match="interrupted save"):
            loaded = lorakit.from_pretrained(_mlp(), folder)
        assert adapter_configs(loaded)["default"].rank == 2
        assert _lora_values(loaded) == {2.0}


def test_save_killed_at_a_random_moment(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    _previous(folder)
    for delay in (0.0, 0.07):
        child = _child(tmp_path, "loop", str(folder), "4")
        assert child.stdout.readline()  # at least one save has completed
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
        loaded = lorakit.from_pretrained(_mlp(), folder)
        values = _lora_values(loaded)
        assert len(values) == 1 and values.pop() >= 1.0  # every tensor from one single save


# -- bad input ------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    lorakit.save_adapter(_adapted(MODEL_CASES[1]), folder)
    return folder


def _unchanged(model: nn.Module) -> None:
    assert lorakit.adapter_names(model) == ()
    assert not list(lorakit.lora_layers(model))


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    # the weights' copy of the config would override the edit: drop lorakit's metadata
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope does not exist"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "nope")


def test_missing_config(saved: Path) -> None:
    (saved / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"holds no adapter_config.json"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_missing_config_lists_subfolders(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"adapters in subfolders: \['adapter'\]"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_corrupt_json(saved: Path) -> None:
    (saved / "adapter_config.json").write_text('{"r": 4,')
    model = tiny_llama()
    with pytest.raises(CheckpointError, match=r"adapter_config.json is not valid JSON"):
        lorakit.load_adapter(model, saved)
    _unchanged(model)


def test_missing_weights(saved: Path) -> None:
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"holds no adapter_model.safetensors"):
        lorakit.load_adapter(tiny_llama(), saved)


@pytest.mark.parametrize("keep", [0, 5, 100, -10])
def test_truncated_or_garbage_safetensors(saved: Path, keep: int) -> None:
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep else b"\x00garbage, not a safetensors file")
    model = tiny_llama()
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors is not a readable"):
        lorakit.load_adapter(model, saved)
    _unchanged(model)


def test_wrong_shapes_missing_and_unexpected_keys_reported_together(saved: Path) -> None:
    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    prefix = "base_model.model.model.layers."
    tensors[prefix + "0.self_attn.q_proj.lora_A.weight"] = torch.zeros(3, 32)
    del tensors[prefix + "1.self_attn.v_proj.lora_B.weight"]
    tensors[prefix + "0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, path, metadata={"format": "pt"})
    model = tiny_llama()
    with pytest.raises(CheckpointError) as err:
        lorakit.load_adapter(model, saved)
    message = str(err.value)
    assert "3 problem(s)" in message and "nothing was loaded" in message
    assert "missing 'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight'" in message
    assert "unexpected 'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight'" in message
    assert "q_proj.lora_A.weight' has shape (3, 32), the model needs (4, 32)" in message
    _unchanged(model)


def _wide_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    )  # fmt: skip


def test_wrong_base_is_refused(saved: Path) -> None:
    other = _wide_llama()
    with pytest.raises(CheckpointError, match=r"saved for another base model .*q_proj' weight"):
        lorakit.load_adapter(other, saved)
    _unchanged(other)


def test_wrong_base_without_lorakit_metadata(saved: Path) -> None:
    _edit_config(saved)  # drops lorakit's metadata (a PEFT file): the tensor shapes tell
    other = _wide_llama()
    shape = r"q_proj.lora_A.weight' has shape \(4, 32\), the model needs \(4, 48\)"
    with pytest.raises(CheckpointError, match=shape):
        lorakit.load_adapter(other, saved)
    _unchanged(other)
    with pytest.raises(CheckpointError, match=r"does not fit this model.*matched no module"):
        lorakit.load_adapter(_mlp(), saved)


@pytest.mark.parametrize("name", ["../x", "/abs/path", "", "a.b", "a/b"])
def test_bad_adapter_names(saved: Path, name: str) -> None:
    model = _adapted(MODEL_CASES[1])
    with pytest.raises(AdapterError, match=r"adapter_name must be a plain identifier"):
        lorakit.save_adapter(model, saved, adapter_name=name)
    fresh = tiny_llama()
    with pytest.raises(AdapterError, match=r"adapter_name must be a plain identifier"):
        lorakit.load_adapter(fresh, saved, adapter_name=name)
    _unchanged(fresh)


def test_duplicate_and_unknown_adapter_names(saved: Path, tmp_path: Path) -> None:
    model = lorakit.load_adapter(tiny_llama(), saved)
    with pytest.raises(AdapterError, match=r"'default' is already on the model"):
        lorakit.load_adapter(model, saved)
    with pytest.raises(AdapterError, match=r"unknown adapter 'nope'"):
        lorakit.save_adapter(model, tmp_path / "out", adapter_name="nope")


def _to_pickle(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    torch.save(load_file(path), folder / "adapter_model.bin")
    path.unlink()


def test_pickle_needs_permission(saved: Path) -> None:
    _to_pickle(saved)
    model = tiny_llama()
    with pytest.raises(CheckpointError, match=r"adapter_model.bin is a pickle file.*allow_pickle"):
        lorakit.load_adapter(model, saved)
    _unchanged(model)
    lorakit.load_adapter(model, saved, allow_pickle=True)
    assert lorakit.adapter_names(model) == ("default",)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused_even_when_allowed(saved: Path) -> None:
    (saved / "adapter_model.safetensors").unlink()
    torch.save({"x": _Evil()}, saved / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"adapter_model.bin is not a readable weights-only"):
        lorakit.load_adapter(tiny_llama(), saved, allow_pickle=True)


def test_unknown_config_keys_warn(saved: Path) -> None:
    _edit_config(saved, shiny_new_option=3)
    with pytest.warns(UserWarning, match=r"unknown keys \['shiny_new_option'\]"):
        lorakit.load_adapter(tiny_llama(), saved)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"lora_bias": True}, r"missing '.*lora_B.bias' \(\d+,\)"),
        ({"use_dora": True}, r"missing '.*lora_magnitude_vector' \(\d+,\)"),
        ({"peft_type": "IA3"}, r"peft_type is 'IA3'"),
        ({"layers_to_transform": [0]}, r"layers_to_transform=\[0\]"),
        ({"init_lora_weights": "corda"}, r"init_lora_weights='corda' rewrites the base"),
        ({"r": None}, r"'r' is missing"),
        ({"r": -1}, r"rank must be a positive integer, got -1"),
        ({"bias": "some"}, r"bias must be one of"),
    ],
)
def test_unsupported_or_invalid_config(saved: Path, changes: dict, match: str) -> None:
    _edit_config(saved, **changes)
    model = tiny_llama()
    with pytest.raises(CheckpointError, match=match):
        lorakit.load_adapter(model, saved)
    _unchanged(model)


def test_read_adapter_needs_no_model(saved: Path) -> None:
    folder, config, tensors, metadata = read_adapter(saved)
    assert folder == saved and config["r"] == 4 and len(tensors) == 8
    assert metadata["format"] == "pt"
