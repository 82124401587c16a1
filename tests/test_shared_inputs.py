"""Shared-input fusion: layers reading one input take their LoRA products as one GEMM, and
the model computes what it computes without fusion (values and gradients), on tiny Llama,
GPT-2 and BERT models, with checkpointing, dropout, autocast, several adapters and DoRA."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import randomise_lora, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from torch import nn

import lorakit
import lorakit.shared_inputs as shared_module
from lorakit import LoraConfig, fuse_shared_inputs, inject, shared_input_groups
from lorakit.errors import ConfigError, TargetNotFoundError
from lorakit.train.grad_checkpoint import enable_gradient_checkpointing
from lorakit.tree import lora_layers

RTOL = 1e-5


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    err = (actual.double() - expected.double()).abs().max()
    assert err <= rtol * expected.double().abs().max().clamp_min(1e-12), float(err)


class _Products:
    """Records the width (number of layers) of every stacked product the groups take."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.widths: list[int] = []
        self._real = shared_module.stacked_products
        monkeypatch.setattr(shared_module, "stacked_products", self)

    def __call__(self, x, factors):
        self.widths.append(len(factors))
        return self._real(x, factors)


def _llama_groups(layers: int = 2) -> tuple[tuple[str, ...], ...]:
    out = []
    for i in range(layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out += [tuple(f"{attn}.{n}_proj" for n in "qkv"), (f"{mlp}.gate_proj", f"{mlp}.up_proj")]
    return tuple(out)


def _bert_groups(layers: int = 2) -> tuple[tuple[str, ...], ...]:
    attn = "bert.encoder.layer.{}.attention.self.{}"
    return tuple(tuple(attn.format(i, n) for n in ("query", "key", "value")) for i in range(layers))


# model builder, its groups, the widths (layers) of the shared products of one forward
MODELS = {
    "llama": (tiny_llama, _llama_groups(), [3, 2, 3, 2]),
    "gpt2": (tiny_gpt2, (), []),  # c_attn is q, k and v in one layer already
    "bert": (tiny_bert, _bert_groups(), [3, 3]),
}


def _pair(make, config: LoraConfig | None = None) -> tuple[nn.Module, nn.Module]:
    """The same adapted model twice: fused (as inject leaves it) and with fusion off."""
    models = []
    for _ in range(2):
        model = make()
        inject(model, config or LoraConfig(rank=4, targets="all-linear"))
        randomise_lora(model)
        models.append(model)
    assert fuse_shared_inputs(models[1], None) == ()
    return models[0], models[1]


def _ids(model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, model.config.vocab_size, (2, 7), generator=generator)


def _step(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Output, then the gradients of every trainable parameter, of one forward + backward."""
    out = model(ids).logits
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    params = [p for p in model.parameters() if p.requires_grad]
    return [out.detach(), *torch.autograd.grad((out * weights).sum(), params)]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fused_equals_unfused_in_value_and_gradient(monkeypatch, name, mode):
    make, groups, widths = MODELS[name]
    fused, plain = _pair(make)
    fused.train(mode == "train")
    plain.train(mode == "train")
    assert shared_input_groups(fused) == groups
    products = _Products(monkeypatch)
    ids = _ids(fused)
    first = _step(fused, ids)
    for got, want in zip(first, _step(plain, ids), strict=True):
        _close(got, want)
    assert sorted(w for w in products.widths if w > 1) == sorted(widths)
    for got, again in zip(first, _step(fused, ids), strict=True):
        assert torch.equal(got, again)  # nothing learned from a call: the same bits


@pytest.mark.parametrize("name", list(MODELS))
def test_no_grad_inference_is_fused_and_equal(monkeypatch, name):
    make, groups, widths = MODELS[name]
    fused, plain = _pair(make)
    products = _Products(monkeypatch)
    ids = _ids(fused)
    with torch.no_grad():
        for _ in range(2):
            products.widths.clear()
            _close(fused(ids).logits, plain(ids).logits)
    assert sorted(w for w in products.widths if w > 1) == sorted(widths)
    assert shared_input_groups(fused) == groups


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_replays_the_same_path(dropout):
    config = LoraConfig(rank=4, targets="all-linear", dropout=dropout)
    fused, plain = _pair(tiny_llama, config)
    checkpointed = copy.deepcopy(fused)
    enable_gradient_checkpointing(checkpointed)
    ids = _ids(fused)
    for model in (fused, plain, checkpointed):
        model.train()
    for _ in range(2):
        torch.manual_seed(0)
        want = _step(plain, ids)
        torch.manual_seed(0)
        for got, expected in zip(_step(checkpointed, ids), want, strict=True):
            _close(got, expected)
        torch.manual_seed(0)
        for got, expected in zip(_step(fused, ids), want, strict=True):
            _close(got, expected)


class _Attention(nn.Module):
    """q reads x; k and v read x, or `source` (cross-attention); o reads something else."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(8, 4, bias=False)
        self.o = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        src = x if source is None else source
        mixed = (self.q(x) * self.k(src)).sum(-1, keepdim=True) + self.v(src).sum(-1, keepdim=True)
        return self.o(torch.tanh(x)) + mixed


def _attention_pair(targets=("q", "k", "v", "o"), **config: object) -> tuple[nn.Module, ...]:
    torch.manual_seed(0)
    fused = _Attention()
    plain = copy.deepcopy(fused)
    for model in (fused, plain):
        inject(model, LoraConfig(rank=3, targets=targets, **config))
        randomise_lora(model)
    fuse_shared_inputs(plain, None)
    return fused, plain


def _grads(model: nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    out = model(*inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    leaves = [t for t in inputs if t.requires_grad]
    return [out.detach(), *torch.autograd.grad(out.pow(2).sum(), params + leaves)]


@pytest.mark.parametrize(("cross", "widths"), [(False, [3]), (True, [3, 2])], ids=["self", "cross"])
def test_members_reading_another_input_lead_their_own_product(monkeypatch, cross, widths):
    fused, plain = _attention_pair()
    assert shared_input_groups(fused) == (("q", "k", "v"),)  # o reads the attention output
    products = _Products(monkeypatch)
    x = torch.randn(2, 5, 8, requires_grad=True)
    inputs = (x, torch.randn(2, 1, 8).expand(2, 5, 8)) if cross else (x,)
    for _ in range(2):
        products.widths.clear()
        for got, want in zip(_grads(fused, *inputs), _grads(plain, *inputs), strict=True):
            _close(got, want)
        assert [w for w in products.widths if w > 1] == widths  # cross: q, k, v, then k, v


def test_a_changed_input_is_not_taken_for_the_shared_one(monkeypatch):
    fused, plain = _attention_pair()
    products = _Products(monkeypatch)
    x = torch.randn(4, 8)
    q_out = fused.q(x)  # the leader keeps k's and v's parts for this x...
    x.mul_(2)  # ...which then changes in place: k must not take the stale part
    _close(fused.k(x), plain.k(x))
    _close(q_out, plain.q(x / 2))
    assert products.widths == [3, 2]  # q's for q, k, v; then k's for k and v


@pytest.mark.parametrize(
    "change",
    ["dropout", "two adapters", "dora", "lora_bias", "merged", "disabled", "autocast", "routing"],
)
def test_layers_that_cannot_share_take_their_own_path(monkeypatch, change):
    targets = ("q", "v", "o") if change == "dora" else ("q", "k", "v", "o")
    config = {"lora_bias": True} if change == "lora_bias" else {}
    fused, plain = _attention_pair(targets, dropout=0.3 if change == "dropout" else 0.0, **config)
    if change == "lora_bias":  # nonzero biases, the same in both
        for model in (fused, plain):
            torch.manual_seed(7)
            for _, layer in lora_layers(model):
                torch.nn.init.normal_(layer.lora["default"].lora_bias)
    if change == "two adapters":
        for model in (fused, plain):
            inject(model, LoraConfig(rank=2, targets=("q", "k")), adapter_name="b")
            randomise_lora(model, seed=5)
            lorakit.set_active(model, ["default", "b"])
    if change == "dora":
        for model in (fused, plain):
            inject(model, LoraConfig(rank=2, targets=("k",), use_dora=True), adapter_name="d")
            randomise_lora(model, seed=5)
            lorakit.set_active(model, ["default", "d"])
    if change == "merged":
        for model in (fused, plain):
            lorakit.merge(model)
    products = _Products(monkeypatch)
    x = torch.randn(3, 8)
    for model in (fused, plain):
        model.train()
    for _ in range(2):
        torch.manual_seed(1)
        want = _run(plain, change, x)
        torch.manual_seed(1)
        _close(_run(fused, change, x), want)
    # two adapters on q and k: v alone; DoRA on k: q and v
    expected = {"dora": [2, 2]}.get(change, [])
    assert [w for w in products.widths if w > 1] == expected


def _run(model: nn.Module, change: str, x: torch.Tensor) -> torch.Tensor:
    if change == "disabled":
        with lorakit.disabled(model):
            return model(x)
    if change == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()
    if change == "routing":
        with lorakit.routing(model, ["default"] * 3):
            return model(x)
    return model(x)


def test_saves_loads_merges_and_routes_as_unfused(tmp_path):
    fused, plain = _pair(tiny_llama)
    ids = _ids(fused)
    lorakit.save_adapter(fused, tmp_path / "a")
    lorakit.save_adapter(plain, tmp_path / "b")
    config = "adapter_config.json"
    assert (tmp_path / "a" / config).read_text() == (tmp_path / "b" / config).read_text()
    saved_a, saved_b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    assert saved_a.keys() == saved_b.keys()
    assert all(torch.equal(saved_a[k], saved_b[k]) for k in saved_a)
    loaded = tiny_llama()
    lorakit.load_adapter(loaded, tmp_path / "a", adapter_name="other")
    assert shared_input_groups(loaded) == _llama_groups()  # linked on load as on inject
    _close(loaded(ids).logits, plain(ids).logits)
    lorakit.load_adapter(fused, tmp_path / "a", adapter_name="other")
    lorakit.load_adapter(plain, tmp_path / "a", adapter_name="other")
    with torch.no_grad(), lorakit.routing(fused, ["default", "other"]):
        routed = fused(ids).logits
    with torch.no_grad(), lorakit.routing(plain, ["default", "other"]):
        _close(routed, plain(ids).logits)
    unfused_out = plain(ids).logits
    lorakit.merge(fused)
    _close(fused(ids).logits, unfused_out)
    lorakit.unmerge(fused)
    _close(fused(ids).logits, unfused_out)
    merged = lorakit.merge_and_unload(fused)
    assert not any(hasattr(m, "lora_fusion") for m in merged.modules())
    _close(merged(ids).logits, unfused_out)


def test_copies_and_pickles_keep_their_groups():
    fused, plain = _attention_pair()
    x = torch.randn(3, 8)
    fused.q(x)  # leaves a product for k and v behind
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert shared_input_groups(clone) == (("q", "k", "v"),)
        assert clone.q.lora_fusion._entry is None  # the pending product is not copied
        _close(clone(x), plain(x))


def test_delete_adapter_unlinks_layers_left_bare():
    fused, _ = _attention_pair()
    inject(fused, LoraConfig(rank=2, targets=("q",)), adapter_name="b")
    lorakit.delete_adapter(fused, "default")
    assert not hasattr(fused.k, "lora_fusion") and type(fused.k) is nn.Linear
    assert shared_input_groups(fused) == ()
    fused(torch.randn(2, 8))


def test_the_switch_names_groups_and_turns_fusion_off(monkeypatch):
    fused, plain = _attention_pair()
    assert fuse_shared_inputs(fused, [["q", "v"]]) == (("q", "v"),)
    products = _Products(monkeypatch)
    x = torch.randn(3, 8)
    _close(fused(x), plain(x))
    assert [w for w in products.widths if w > 1] == [2]
    inject(fused, LoraConfig(rank=2, targets=("k", "o")), adapter_name="b")
    assert shared_input_groups(fused) == (("q", "v"),)  # named groups survive an inject
    assert fuse_shared_inputs(fused, None) == ()
    inject(fused, LoraConfig(rank=2, targets=("q", "k")), adapter_name="c")
    assert shared_input_groups(fused) == ()  # and so does "off"
    assert fuse_shared_inputs(fused) == (("q", "k", "v"),)


@pytest.mark.parametrize(
    ("groups", "error", "message"),
    [
        ("all", ConfigError, 'groups must be "auto", None or a list'),
        ([["q"]], ConfigError, "at least two module paths"),
        (["qk"], ConfigError, "at least two module paths"),
        ([["q", "q"]], ConfigError, "names a layer twice"),
        ([["q", "k"], ["k", "v"]], ConfigError, "names a layer twice or one of another group"),
        ([["q", "nope"]], TargetNotFoundError, "'nope' is no adapted Linear"),
    ],
)
def test_named_groups_are_checked(groups, error, message):
    fused, _ = _attention_pair()
    before = shared_input_groups(fused)
    with pytest.raises(error, match=message):
        fuse_shared_inputs(fused, groups)
    assert shared_input_groups(fused) == before


class _Family(nn.Module):
    """Layers named as one family, of two input widths; and two unnamed layers."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 3), nn.Linear(5, 3), nn.Linear(4, 2)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)


def test_groups_need_one_input_width():
    model = _Family()
    inject(model, LoraConfig(targets=("q", "k", "v", "a", "b")))
    assert shared_input_groups(model) == (("q", "v"),)  # k's width differs; a, b unnamed
    with pytest.raises(ConfigError, match=r"mixes input widths \[4, 5\]"):
        fuse_shared_inputs(model, [["q", "k"]])
    assert fuse_shared_inputs(model, [["a", "b"], ["q", "v"]]) == (("q", "v"), ("a", "b"))


@pytest.mark.parametrize(
    ("rows", "grad", "widths"), [(4, False, [3]), (64, False, []), (64, True, [3])]
)
def test_inference_that_folds_the_adapters_takes_no_product(monkeypatch, rows, grad, widths):
    fused, plain = _attention_pair()
    products = _Products(monkeypatch)
    x = torch.randn(rows, 8)
    with torch.set_grad_enabled(grad):
        _close(fused(x), plain(x))  # many rows: W + s B A beats x A^T, which is not needed
    assert [w for w in products.widths if w > 1] == widths
