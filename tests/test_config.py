"""LoraConfig: defaults, normalisation, per-module overrides, and one error per bad option."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle

import pytest
import torch

from lorakit import (
    AdapterError,
    CheckpointError,
    ConfigError,
    LoraConfig,
    LorakitError,
    MergeError,
    TargetNotFoundError,
    UnsupportedLayerError,
)
from lorakit.config import pattern_key, scaling


def test_defaults_are_the_seeds():
    config = LoraConfig()
    assert (config.rank, config.alpha, config.dropout) == (8, 16.0, 0.0)
    assert config.targets == "all-linear"
    assert config.bias == "none" and config.init == "kaiming"
    assert config.dtype is torch.float32
    assert config.scaling == 2.0


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoraConfig().rank = 4  # type: ignore[misc]


def test_normalises_lists_to_tuples_and_numbers_to_float():
    config = LoraConfig(
        alpha=32,
        targets=["q_proj", "v_proj"],
        exclude=["lm_head"],
        modules_to_save=["classifier"],
        alpha_pattern={"v_proj": 8},
        dtype="bfloat16",
    )
    assert config.targets == ("q_proj", "v_proj")
    assert config.exclude == ("lm_head",)
    assert config.modules_to_save == ("classifier",)
    assert config.alpha == 32.0 and isinstance(config.alpha, float)
    assert config.alpha_pattern == {"v_proj": 8.0}
    assert config.dtype is torch.bfloat16
    assert LoraConfig(modules_to_save="classifier").modules_to_save == ("classifier",)
    assert LoraConfig(dtype=None).dtype is None


def test_none_patterns_are_empty():
    config = LoraConfig(rank_pattern=None, alpha_pattern=None)
    assert config.rank_pattern == {} and config.alpha_pattern == {}


def test_pattern_dicts_are_copied():
    ranks = {"q_proj": 4}
    config = LoraConfig(rank_pattern=ranks)
    ranks["v_proj"] = 2
    assert config.rank_pattern == {"q_proj": 4}


@pytest.mark.parametrize(
    ("rank", "alpha", "rslora", "expected"),
    [(8, 16.0, False, 2.0), (4, 8.0, True, 4.0), (16, 16.0, True, 4.0), (3, 1.0, False, 1 / 3)],
)
def test_scaling(rank, alpha, rslora, expected):
    assert scaling(rank, alpha, rslora) == pytest.approx(expected)
    config = LoraConfig(rank=rank, alpha=alpha, use_rslora=rslora)
    assert config.scaling == pytest.approx(expected)
    if rslora:
        assert config.scaling == pytest.approx(alpha / math.sqrt(rank))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", "q_proj"),
        ("q_proj", "q_proj"),
        ("model.layers.0.self_attn.qq_proj", None),  # a suffix of the name, not of a part
        ("model.layers.0.self_attn.q_proj_extra", None),
        ("model.layers.1.mlp.down_proj", r"layers\.1\.mlp\.down_proj"),
        ("model.layers.11.mlp.down_proj", None),
        ("model.layers.0.mlp.down_proj", None),
    ],
)
def test_pattern_key_matches_suffix_only(name, expected):
    patterns = {"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2}
    assert pattern_key(patterns, name) == expected


def test_for_module_applies_overrides_to_matching_modules_only():
    config = LoraConfig(rank=8, alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 2.0})
    q = config.for_module("model.layers.0.self_attn.q_proj")
    v = config.for_module("model.layers.0.self_attn.v_proj")
    k = config.for_module("model.layers.0.self_attn.k_proj")
    assert (q.rank, q.alpha, q.scaling) == (4, 16.0, 4.0)
    assert (v.rank, v.alpha, v.scaling) == (8, 2.0, 0.25)
    assert k is config
    assert config.rank == 8 and config.alpha == 16.0  # the shared config is not mutated


def test_for_module_keeps_rslora():
    config = LoraConfig(rank=16, alpha=8, use_rslora=True, rank_pattern={"fc1": 4})
    assert config.for_module("fc1").scaling == pytest.approx(8 / 2)
    assert config.for_module("fc2").scaling == pytest.approx(8 / 4)


BAD = [
    ("rank", 0, r"rank must be a positive integer, got 0"),
    ("rank", -1, r"rank must be a positive integer, got -1"),
    ("rank", 2.5, r"rank must be a positive integer, got 2\.5"),
    ("rank", True, r"rank must be a positive integer, got True"),
    ("rank", "8", r"rank must be a positive integer, got '8'"),
    ("alpha", 0, r"alpha must be a positive finite number, got 0"),
    ("alpha", -1, r"alpha must be a positive finite number, got -1"),
    ("alpha", float("nan"), r"alpha must be a positive finite number, got nan"),
    ("alpha", float("inf"), r"alpha must be a positive finite number, got inf"),
    ("alpha", "x", r"alpha must be a positive finite number, got 'x'"),
    ("alpha", True, r"alpha must be a positive finite number, got True"),
    ("dropout", -0.1, r"dropout must be a number in \[0, 1\), got -0\.1"),
    ("dropout", 1.0, r"dropout must be a number in \[0, 1\), got 1\.0"),
    ("dropout", "0.1", r"dropout must be a number in \[0, 1\), got '0\.1'"),
    ("bias", "some", r"bias must be one of \['none', 'all', 'lora_only'\], got 'some'"),
    ("init", "xavier", r"init must be one of \['kaiming', .*\] or 'pissa_niter_K'.*, got 'xavier'"),
    ("init", True, r"init must be one of .*, got True"),
    ("dtype", "float33", r"dtype must be a floating torch dtype or its name, got 'float33'"),
    ("dtype", "int32", r"dtype must be a floating torch dtype or its name, got 'int32'"),
    ("dtype", 3, r"dtype must be a floating torch dtype or its name, got 3"),
    ("targets", "q_proj(", r"targets is not a valid regex: 'q_proj\('"),
    ("targets", [], r"targets must name at least one module"),
    ("targets", ["q_proj", ""], r"targets must be a list of module names"),
    ("targets", [1], r"targets must be a list of module names, got \[1\]"),
    ("exclude", "[", r"exclude is not a valid regex: '\['"),
    ("exclude", [None], r"exclude must be a list of module names"),
    ("modules_to_save", [3], r"modules_to_save must be a list of module names"),
    ("rank_pattern", {"q_proj": 0}, r"rank_pattern\['q_proj'\] must be a positive integer, got 0"),
    ("rank_pattern", {"(": 4}, r"rank_pattern is not a valid regex: '\('"),
    ("alpha_pattern", {"v": -2.0}, r"alpha_pattern\['v'\] must be a positive finite number"),
    ("rank_pattern", [("q", 4)], r"rank_pattern must map module name suffixes to values"),
    ("alpha_pattern", {1: 2.0}, r"alpha_pattern must map module name suffixes to values, got"),
    ("use_rslora", "yes", r"use_rslora must be a bool, got 'yes'"),
    # Values that used to pass here and make inject fail part way (the robustness issue):
    ("rank_pattern", {"(?i)0": 2}, r"rank_pattern is not a valid regex: '\(\?i\)0' \(global"),
    ("alpha_pattern", {"a|(?i)b": 2.0}, r"alpha_pattern is not a valid regex: 'a\|\(\?i\)b'"),
    ("dtype", torch.float8_e4m3fn, r"dtype must be one of \['float16', 'bfloat16', 'float32', "
     r"'float64'\] \(or None\), got torch\.float8_e4m3fn"),
    ("dtype", "float8_e5m2", r"dtype must be one of .* \(or None\), got 'float8_e5m2'"),
    ("alpha", 1e300, r"alpha must be at most 1e\+06 \(the scale alpha / rank multiplies every "
     r"adapter output\), got 1e\+300"),
    ("alpha", 1e6 + 1, r"alpha must be at most 1e\+06"),
    ("alpha_pattern", {"v": 1e300}, r"alpha_pattern\['v'\] must be at most 1e\+06"),
]


@pytest.mark.parametrize(("option", "value", "message"), BAD, ids=[f"{o}={v!r}" for o, v, _ in BAD])
def test_bad_option_raises_config_error_naming_it(option, value, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**{option: value})


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64", None])
def test_adapter_dtypes_accepted(dtype):
    expected = None if dtype is None else getattr(torch, dtype)
    assert LoraConfig(dtype=dtype).dtype is expected


def test_alpha_bound_is_inclusive_and_pattern_keys_match_as_compiled():
    assert LoraConfig(alpha=1e6).alpha == 1e6
    config = LoraConfig(rank_pattern={"(?i:FC)2": 2, "a|b": 3})  # scoped flag, alternation
    assert config.for_module("net.fc2").rank == 2
    assert config.for_module("x.b").rank == 3 and config.for_module("xb").rank == 8


def test_int_dtype_object_is_rejected():
    with pytest.raises(ConfigError, match="dtype must be a floating torch dtype"):
        LoraConfig(dtype=torch.int64)


@pytest.mark.parametrize(
    ("error", "bases"),
    [
        (ConfigError, (ValueError,)),
        (UnsupportedLayerError, (TypeError,)),
        (TargetNotFoundError, (ValueError,)),
        (AdapterError, (ValueError,)),
        (MergeError, (ValueError,)),
        (CheckpointError, (ValueError,)),
    ],
)
def test_errors_subclass_builtin_errors(error, bases):
    assert issubclass(error, LorakitError)
    for base in bases:
        assert issubclass(error, base)


def test_configs_are_hashable_and_hash_by_value():
    a = LoraConfig(rank=4, rank_pattern={"q": 8, "v": 2}, alpha_pattern={"q": 4.0})
    same = LoraConfig(rank=4, rank_pattern={"v": 2, "q": 8}, alpha_pattern={"q": 4})
    other = LoraConfig(rank=4, rank_pattern={"q": 8, "v": 4}, alpha_pattern={"q": 4.0})
    assert a == same and hash(a) == hash(same)
    assert len({a, same, other, LoraConfig()}) == 3
    assert {a: "adapter"}[same] == "adapter"


def test_patterns_are_read_only_and_the_hash_stays():
    config = LoraConfig(rank_pattern={"q": 8}, alpha_pattern={"v": 2})
    before = hash(config)
    edits = [
        lambda p: p.__setitem__("k", 2),
        lambda p: p.__delitem__("q"),
        lambda p: p.update(k=2),
        lambda p: p.setdefault("k", 2),
        lambda p: p.pop("q"),
        lambda p: p.popitem(),
        lambda p: p.clear(),
        lambda p: p.__ior__({"k": 2}),
    ]
    for edit in edits:
        for pattern in (config.rank_pattern, config.alpha_pattern):
            with pytest.raises(TypeError, match=r"pattern is read-only; use dataclasses\.replace"):
                edit(pattern)
    assert config.rank_pattern == {"q": 8} and config.alpha_pattern == {"v": 2.0}
    assert hash(config) == before == hash(LoraConfig(rank_pattern={"q": 8}, alpha_pattern={"v": 2}))
    assert dataclasses.replace(config, rank_pattern={"q": 4}).rank_pattern == {"q": 4}


def test_frozen_patterns_copy_pickle_and_serialise_as_plain_dicts():
    config = LoraConfig(rank_pattern={"q": 8, "v": 2}, alpha_pattern={"v": 2})
    for other in (copy.deepcopy(config), copy.copy(config), pickle.loads(pickle.dumps(config))):
        assert other == config and hash(other) == hash(config)
        with pytest.raises(TypeError, match="read-only"):
            other.rank_pattern["q"] = 1
    fields = dataclasses.asdict(config)
    assert json.dumps([fields["rank_pattern"], fields["alpha_pattern"]]) == (
        '[{"q": 8, "v": 2}, {"v": 2.0}]'
    )
    assert repr(config.rank_pattern) == "{'q': 8, 'v': 2}"
