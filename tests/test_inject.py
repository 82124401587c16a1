"""inject on tiny real models: no-op start, targeting, freezing, overrides, dtype, meta, errors."""

from __future__ import annotations

import copy
import re

import peft
import pytest
import torch
from conftest import (
    MODEL_CASES,
    ModelCase,
    randomise_lora,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
)
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import (
    AdapterError,
    ConfigError,
    LoRA,
    LoraConfig,
    LoraLayer,
    TargetNotFoundError,
    UnsupportedLayerError,
)
from lorakit.adapter_registry import adapter_configs
from lorakit.targets import without_missing_saved
from lorakit.tree import base_modules, lora_layers

BERT = next(c for c in MODEL_CASES if c.id == "bert")


def adapter_params(model: nn.Module) -> set[str]:
    """Names of the adapter parameters, found by module type (never by substring)."""
    found = set()
    for name, module in model.named_modules():
        if isinstance(module, LoRA):
            found |= {f"{name}.{p}" for p, _ in module.named_parameters()}
    return found


def adapted_paths(model: nn.Module) -> set[str]:
    return {name for name, _ in lora_layers(model)}


# -- a fresh adapter is a no-op ----------------------------------------------------------
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@pytest.mark.parametrize("all_linear", [False, True], ids=["targets", "all-linear"])
def test_fresh_adapter_is_exact_noop(model_case: ModelCase, init: str, all_linear: bool):
    model = model_case.make()
    expected = model_case.run(model)
    targets = "all-linear" if all_linear else model_case.targets
    report = lorakit.inject(model, LoraConfig(targets=targets, init=init))
    assert report.adapted and set(report.adapted) == adapted_paths(model)
    assert torch.equal(model_case.run(model), expected)
    randomise_lora(model)
    assert not torch.allclose(model_case.run(model), expected, atol=1e-4)


def test_report_counts_and_summary(model_case: ModelCase):
    model = model_case.make()
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    report = lorakit.inject(model, LoraConfig(rank=2, targets=model_case.targets))
    lora_numel = sum(p.numel() for n, p in model.named_parameters() if n in adapter_params(model))
    assert report.adapter_name == "default"
    assert report.trainable == lora_numel > 0
    assert report.total == total + lora_numel
    assert lorakit.trainable_parameters(model) == (report.trainable, report.total)
    assert f"trainable params: {report.trainable:,}" in str(report)
    table = lorakit.summary(model)
    assert all(path in table for path in report.adapted)


def test_counts_match_peft_on_tiny_llama():
    ours = tiny_llama()
    report = lorakit.inject(ours, LoraConfig(rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()


# -- base state dict unchanged -------------------------------------------------------------
def test_base_state_dict_loads_into_injected_model(model_case: ModelCase):
    base = model_case.make()
    base_sd = base.state_dict()
    model = model_case.make()
    lorakit.inject(model, LoraConfig(targets=model_case.targets))
    sd = model.state_dict()
    assert set(base_sd) <= set(sd)
    extra = set(sd) - set(base_sd)
    assert extra == adapter_params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # so loading has something to restore
    result = model.load_state_dict(base_sd, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == extra
    for key, value in base_sd.items():
        assert torch.equal(model.state_dict()[key], value), key


# -- only adapters (and what the config names) train ---------------------------------------
def _train_step(model_case: ModelCase, model: nn.Module) -> dict[str, torch.Tensor]:
    """One AdamW step over *all* parameters; returns the parameters before the step."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model_case.run(model).square().mean().backward()
    optimizer.step()
    return before


def _biases(model: nn.Module, paths: set[str] | None = None) -> set[str]:
    return {
        f"{name}.bias"
        for name, module in base_modules(model)
        if isinstance(getattr(module, "bias", None), nn.Parameter)
        and (paths is None or name in paths)
    }


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_only_trainable_parameters_get_gradients(model_case: ModelCase, bias: str):
    model = model_case.make()
    lorakit.inject(model, LoraConfig(targets=model_case.targets, bias=bias))
    randomise_lora(model)  # B != 0, so A gets a gradient too
    expected = adapter_params(model)
    if bias == "all":
        expected |= _biases(model)
    elif bias == "lora_only":
        expected |= _biases(model, adapted_paths(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    before = _train_step(model_case, model)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected
    for name, p in model.named_parameters():
        if name in expected:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"{name} changed"


def test_modules_to_save_train_in_full():
    model = tiny_bert()
    report = lorakit.inject(model, LoraConfig(targets="all-linear", modules_to_save=["classifier"]))
    assert report.modules_to_save == ("classifier",)
    assert "classifier" not in report.adapted  # saved in full, not adapted
    assert type(model.classifier) is nn.Linear
    randomise_lora(model)
    expected = adapter_params(model) | {"classifier.weight", "classifier.bias"}
    before = _train_step(BERT, model)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) is (name not in expected), name


# -- targets -------------------------------------------------------------------------------
def test_targets_list_of_suffixes():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(targets=["q_proj", "self_attn.v_proj"]))
    assert adapted_paths(model) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    }


def test_targets_regex_matches_whole_path():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(targets=r"model\.layers\.1\.mlp\.(up|down)_proj"))
    assert adapted_paths(model) == {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(targets=r".*_proj"))
    assert len(adapted_paths(model)) == 14  # 7 projections x 2 layers, never lm_head


@pytest.mark.parametrize(
    ("make", "head", "count", "kind"),
    [(tiny_llama, "lm_head", 14, nn.Linear), (tiny_gpt2, "lm_head", 8, Conv1D)],
    ids=["llama", "gpt2"],
)
def test_all_linear_leaves_out_the_output_head(make, head, count, kind):
    model = make()
    lorakit.inject(model, LoraConfig(targets="all-linear"))
    paths = adapted_paths(model)
    assert head not in paths and type(model.get_submodule(head)) is nn.Linear
    assert len(paths) == count
    assert all(isinstance(model.get_submodule(p), kind) for p in paths)


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_all_linear_skips_multihead_attention_out_proj():
    torch.manual_seed(0)
    model = WithAttention()
    lorakit.inject(model, LoraConfig())
    assert adapted_paths(model) == {"proj"}
    assert not isinstance(model.attn.out_proj, LoraLayer)


def test_targeting_multihead_attention_out_proj_raises():
    model = WithAttention()
    with pytest.raises(UnsupportedLayerError, match=r"'attn\.out_proj'.*MultiheadAttention"):
        lorakit.inject(model, LoraConfig(targets=["out_proj"]))
    assert not adapted_paths(model)


@pytest.mark.parametrize(
    "exclude",
    [("o_proj", "mlp.gate_proj", "up_proj", "down_proj"), r".*\.(o_proj|mlp\..*)"],
    ids=["suffixes", "regex"],
)
def test_exclude(exclude):
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(targets="all-linear", exclude=exclude))
    assert {p.rsplit(".", 1)[1] for p in adapted_paths(model)} == {"q_proj", "k_proj", "v_proj"}


def test_second_adapter_reuses_the_layer():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(targets=["q_proj"]), "a")
    lorakit.inject(model, LoraConfig(targets=["q_proj", "v_proj"]), "b")
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is lorakit.LoRALinear and type(q).base_class is nn.Linear
    assert tuple(q.lora) == ("a", "b")
    assert tuple(model.model.layers[0].self_attn.v_proj.lora) == ("b",)
    assert tuple(adapter_configs(model)) == ("a", "b")


# -- per-module overrides and scaling -------------------------------------------------------
def test_rank_and_alpha_patterns_apply_to_matching_suffix_only():
    model = tiny_llama()
    config = LoraConfig(
        rank=8,
        alpha=16,
        targets=["q_proj", "k_proj", "v_proj"],
        rank_pattern={"q_proj": 4, r"layers\.1\.self_attn\.k_proj": 2},
        alpha_pattern={"v_proj": 4.0},
    )
    lorakit.inject(model, config)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        q, k, v = (getattr(attn, p).lora["default"] for p in ("q_proj", "k_proj", "v_proj"))
        assert (q.rank, q.alpha, q.scaling) == (4, 16.0, 4.0)
        assert q.lora_A.shape == (4, 32) and q.lora_B.shape == (32, 4)
        assert (k.rank, k.scaling) == ((2, 8.0) if i == 1 else (8, 2.0))
        assert (v.rank, v.alpha, v.scaling) == (8, 4.0, 0.5)
    assert config.rank == 8 and config.rank_pattern["q_proj"] == 4  # not mutated


def test_rslora_scales_by_sqrt_rank():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(rank=16, alpha=8, use_rslora=True, rank_pattern={"v_proj": 4}))
    q = model.model.layers[0].self_attn.q_proj.lora["default"]
    v = model.model.layers[0].self_attn.v_proj.lora["default"]
    assert q.scaling == pytest.approx(8 / 4) and v.scaling == pytest.approx(8 / 2)


# -- dtype ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "expected"), [(torch.float32, torch.float32), (None, torch.bfloat16)]
)
def test_adapter_dtype_on_bfloat16_model(dtype, expected):
    model = tiny_llama().to(torch.bfloat16)
    tokens = torch.randint(0, 100, (2, 7))
    base = model(tokens).logits
    lorakit.inject(model, LoraConfig(targets=["q_proj", "v_proj"], dtype=dtype))
    assert {p.dtype for n, p in model.named_parameters() if n in adapter_params(model)} == {
        expected
    }
    assert model.model.layers[0].self_attn.q_proj.weight.dtype is torch.bfloat16
    logits = model(tokens).logits
    assert logits.dtype is torch.bfloat16 and torch.equal(logits, base)
    randomise_lora(model)
    logits = model(tokens).logits
    assert logits.dtype is torch.bfloat16
    logits.float().square().mean().backward()
    q = model.model.layers[0].self_attn.q_proj.lora["default"]
    assert q.lora_A.grad.dtype is expected


# -- meta device ---------------------------------------------------------------------------
def test_meta_device_llama_2_7b_is_never_materialised():
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    total_before = sum(p.numel() for p in model.parameters())
    report = lorakit.inject(model, LoraConfig(rank=8, targets=["q_proj", "v_proj"]))
    expected = 0
    for _, layer in lora_layers(model):
        out_features, in_features = layer.weight.shape
        expected += 8 * (in_features + out_features)
    assert expected == 4_194_304 == report.trainable  # PEFT's figure for r=8 q,v on Llama-2-7B
    assert report.total == total_before + expected == 6_742_609_920
    assert len(report.adapted) == 64
    assert all(p.is_meta for p in model.parameters())
    lorakit.merge(model)  # merging on meta is bookkeeping only
    assert all(p.is_meta for p in model.parameters())


# -- pickling and copying --------------------------------------------------------------------
def test_lora_model_pickles_and_deepcopies(model_case: ModelCase, tmp_path):
    model = model_case.make()
    lorakit.inject(model, LoraConfig(targets=model_case.targets, dropout=0.1))
    randomise_lora(model)
    expected = model_case.run(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    clone = copy.deepcopy(model)
    for other in (loaded, clone):
        assert torch.equal(model_case.run(other), expected)
        assert adapted_paths(other) == adapted_paths(model)
        assert adapter_configs(other) == adapter_configs(model)
    randomise_lora(clone, seed=7)  # the copy is independent of the original
    assert torch.equal(model_case.run(model), expected)


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "kind", "names"),
    [
        (tiny_llama, "LlamaForCausalLM", "['embed_tokens', 'q_proj', 'k_proj', 'v_proj', "
         "'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'lm_head']"),
        (tiny_bert, "BertForSequenceClassification", "['word_embeddings', "
         "'position_embeddings', 'token_type_embeddings', 'query', 'key', 'value', 'dense', "
         "'classifier']"),
    ],
    ids=["llama", "bert"],
)
def test_targets_matching_nothing_lists_adaptable_layer_names(make, kind, names):
    model = make()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    message = (
        rf"targets=\('nope',\) matched no module of {kind}; the layers lorakit can adapt here "
        rf"are named {re.escape(names)} \(a name matches a path's end\), "
        r'or use targets="all-linear"$'
    )
    with pytest.raises(TargetNotFoundError, match=message):
        lorakit.inject(model, LoraConfig(targets=["nope"]))
    with pytest.raises(TargetNotFoundError, match=r"targets='x\.\*y' matched no module.*q"):
        lorakit.inject(model, LoraConfig(targets="x.*y"))
    assert not adapted_paths(model) and not adapter_configs(model)
    assert not [k for k in vars(model) if k.startswith("lora")]
    assert_same_state(model, state)


def test_all_linear_matching_nothing_does_not_suggest_itself():
    model = nn.Sequential(nn.Embedding(10, 4))
    message = r"are named \['0'\] \(a name matches a path's end\)$"
    with pytest.raises(TargetNotFoundError, match=message):
        lorakit.inject(model, LoraConfig(targets="all-linear"))


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`model`'s state dict has exactly the keys of `state`, with bitwise equal values."""
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key


def test_modules_to_save_matching_nothing_raises_before_anything_changes():
    model = tiny_bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(targets=["query"], modules_to_save=["classifier", "nonexistent_head"])
    message = (
        r"modules_to_save=\['classifier', 'nonexistent_head'\]: \['nonexistent_head'\] matched "
        r"no module of BertForSequenceClassification, whose top-level modules are "
        r"\['bert', 'dropout', 'classifier'\]"
    )
    with pytest.raises(TargetNotFoundError, match=message):
        lorakit.inject(model, config)
    assert not adapted_paths(model) and not adapter_configs(model)
    assert all(p.requires_grad for p in model.parameters())
    assert_same_state(model, state)


def test_without_missing_saved_drops_only_the_heads_a_model_lacks():
    # PEFT writes ["classifier", "score"] for every sequence classifier; loaders drop the absent.
    config = LoraConfig(targets=["query"], modules_to_save=["classifier", "score"])
    kept = without_missing_saved(tiny_bert(), config)
    assert kept.modules_to_save == ("classifier",) and kept.targets == config.targets
    assert without_missing_saved(tiny_bert(), kept) is kept


# -- a failed inject changes nothing -----------------------------------------------------
def _edited_past_validation() -> LoraConfig:
    """A config whose rank_pattern key fails only once embedded (set after validation)."""
    config = LoraConfig(targets=["fc1", "fc2"])
    object.__setattr__(config, "rank_pattern", {"(?i)fc2": 2})
    return config


def _fc2_to(dtype: torch.dtype):
    def prepare(model: nn.Module) -> None:
        model.fc2.to(dtype)

    return prepare


FAILING_INJECTS = [
    pytest.param(
        lambda model: None,
        lambda: LoraConfig(targets=["fc1", "fc2"], rank_pattern={"fc2": 2**62}),
        AdapterError,
        r"module 'fc2': cannot build adapter 'default' with rank=4611686018427387904, "
        r"dtype=torch.float32 for a weight of shape \(16, 16\): Storage size calculation "
        r"overflowed.*; the model is left as it was",
        id="rank-too-large",
    ),
    pytest.param(
        _fc2_to(torch.float8_e4m3fn),
        lambda: LoraConfig(targets=["fc1", "fc2"], dtype=None),
        AdapterError,
        r"module 'fc2': cannot build adapter 'default' with rank=8, dtype=torch.float8_e4m3fn "
        r"for a weight of shape \(16, 16\): .*not implemented",
        id="float8-base",
    ),
    pytest.param(
        _fc2_to(torch.float16),
        lambda: LoraConfig(targets=["fc1", "fc2"], rank=1, alpha=1e5, dtype=None),
        ConfigError,
        r"module 'fc2': adapter 'default': the scale alpha / rank = 100000 overflows the "
        r"adapter dtype torch.float16",
        id="scale-overflows-float16",
    ),
    pytest.param(
        lambda model: None,
        _edited_past_validation,
        AdapterError,
        r"cannot add adapter 'default' to module 'fc1': error: global flags not at the start",
        id="pattern-edited-past-validation",
    ),
]


def _everything(model: nn.Module) -> tuple:
    """What inject may change: state dict, module classes, requires_grad, adapter state."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [(n, type(m)) for n, m in model.named_modules()]
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
    adapters = [(n, tuple(x.lora), x.lora_active) for n, x in lora_layers(model)]
    return state, classes, grads, adapters, dict(adapter_configs(model))


@pytest.mark.parametrize(("prepare", "make_config", "error", "message"), FAILING_INJECTS)
@pytest.mark.parametrize("earlier", [False, True], ids=["bare", "earlier-adapter"])
def test_failed_inject_changes_nothing_and_the_name_stays_free(
    prepare, make_config, error, message, earlier
):
    model = tiny_mlp()
    prepare(model)
    if earlier:  # a trained adapter already on fc1, with its own frozen/trainable split
        lorakit.inject(model, LoraConfig(targets=["fc1"], modules_to_save=["head"]), "first")
    before = _everything(model)
    with pytest.raises(error, match=message):
        lorakit.inject(model, make_config())
    after = _everything(model)
    assert_same_state(model, before[0])
    assert after[1:] == before[1:]
    assert tuple(adapter_configs(model)) == (("first",) if earlier else ())
    for name, module in model.named_modules():
        if not isinstance(module, (LoraLayer, LoRA)):  # nothing is kept on the root either
            assert not [k for k in vars(module) if k.startswith("lora")], name
    report = lorakit.inject(model, LoraConfig(targets=["fc1", "fc2"]))
    assert report.adapted == ("fc1", "fc2") and "default" in adapter_configs(model)
    assert model.fc2.lora_active == ("default",)


class WithNorm(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.conv = nn.Conv1d(4, 4, 3, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.fc(self.norm(x)).transpose(1, 2))


@pytest.mark.parametrize(
    ("model", "targets", "message"),
    [
        (WithNorm(), ["norm"], "cannot adapt a layer of type LayerNorm"),
        (tiny_llama(), ["q_proj", "input_layernorm"], "LlamaRMSNorm"),
    ],
    ids=["layernorm", "rmsnorm"],
)
def test_unsupported_layer_raises_before_anything_changes(model, targets, message):
    with pytest.raises(UnsupportedLayerError, match=message):
        lorakit.inject(model, LoraConfig(targets=targets))
    assert not adapted_paths(model) and not adapter_configs(model)


def test_duplicate_adapter_name_raises():
    model = tiny_mlp()
    lorakit.inject(model, LoraConfig(targets=["fc1"]))
    with pytest.raises(AdapterError, match="adapter 'default' is already on the model"):
        lorakit.inject(model, LoraConfig(targets=["fc2"]))
    assert adapted_paths(model) == {"fc1"}


@pytest.mark.parametrize("name", ["", "../x", "a.b", "a b", "x/y", 3, None])
def test_bad_adapter_name_raises(name):
    model = tiny_mlp()
    message = "adapter_name must be a plain identifier, got " + re.escape(repr(name))
    with pytest.raises(AdapterError, match=message):
        lorakit.inject(model, LoraConfig(targets=["fc1"]), adapter_name=name)
    assert not adapted_paths(model)


def test_errors_are_builtin_subclasses():
    with pytest.raises(ValueError):
        lorakit.inject(tiny_mlp(), LoraConfig(targets=["nope"]))
    with pytest.raises(TypeError):
        lorakit.inject(WithNorm(), LoraConfig(targets=["norm"]))
    with pytest.raises(ValueError):
        lorakit.inject(tiny_mlp(), adapter_name="a.b")


def test_lora_only_bias_with_an_adapted_embedding():
    """An Embedding has no bias; bias="lora_only" trains the biases of the other targets."""
    model = tiny_bert()
    lorakit.inject(model, LoraConfig(targets=["word_embeddings", "query"], bias="lora_only"))
    randomise_lora(model)
    expected = adapter_params(model) | {
        f"bert.encoder.layer.{i}.attention.self.query.bias" for i in range(2)
    }
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    _train_step(BERT, model)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected


class ScaledLinear(nn.Linear):
    """A Linear subclass (like many in the wild): adapted through a class made at run time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(x)


class WithSubclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = ScaledLinear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_adapted_subclass_pickles_and_deepcopies(tmp_path):
    torch.manual_seed(0)
    model = WithSubclass()
    x = torch.randn(3, 6)
    lorakit.inject(model, LoraConfig(targets=["fc"]))
    randomise_lora(model)
    expected = model(x)
    assert isinstance(model.fc, ScaledLinear) and isinstance(model.fc, LoraLayer)
    torch.save(model, tmp_path / "model.pt")
    for other in (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(model)):
        assert type(other.fc) is type(model.fc)
        assert torch.equal(other(x), expected)
        assert type(other.fc.restore()) is ScaledLinear


class Encoder(nn.Module):
    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed
        self.fc = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed_tokens(ids))


class SharedEmbedding(nn.Module):
    """One embedding registered at two paths, as T5 and BART do in transformers 4.x."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Embedding(10, 4)
        self.encoder = Encoder(self.shared)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids) + self.shared(ids)


def test_module_shared_between_paths_is_adapted_once():
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    base = SharedEmbedding()(ids)
    model = SharedEmbedding()
    report = lorakit.inject(model, LoraConfig(targets=r".*(shared|embed_tokens|fc)"))
    assert report.adapted == ("shared", "encoder.fc")  # named_modules' paths, as in PEFT
    assert isinstance(model.encoder.embed_tokens, LoraLayer)
    assert report.trainable == 8 * (10 + 4) + 8 * (4 + 4)
    randomise_lora(model)
    adapted = model(ids)
    lorakit.merge(model)
    assert (model(ids) - adapted).abs().max().item() <= 1e-5
    lorakit.unload(model)
    assert type(model.shared) is nn.Embedding and not list(lora_layers(model))
    torch.testing.assert_close(model(ids), base, atol=1e-5, rtol=0)


def test_print_trainable_parameters(capsys):
    model = tiny_mlp()
    lorakit.inject(model, LoraConfig(rank=2, targets=["fc1"]))
    lorakit.print_trainable_parameters(model)
    trainable, total = 2 * (8 + 16), 8 * 16 + 16 + 16 * 16 + 16 + 16 * 4 + 4 + 2 * (8 + 16)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f}"
    )
