"""Mixed-adapter batches: every row equals that row run alone with only its adapter."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import VOCAB, randomise_lora, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.errors import AdapterError, UnsupportedLayerError
from lorakit.layers.routing_hook import RoutingHook

ATOL = 1e-5
# (id, model builder, targets per adapter: different ranks, different layers)
MODELS: list[tuple[str, Callable[[], nn.Module], dict[str, tuple]]] = [
    (
        "llama",
        tiny_llama,
        {
            "a": (4, ("q_proj", "v_proj", "down_proj")),
            "b": (2, ("q_proj", "o_proj", "embed_tokens")),
            "c": (8, ("k_proj", "up_proj", "gate_proj")),
        },
    ),
    (
        "gpt2",
        tiny_gpt2,
        {"a": (4, ("c_attn",)), "b": (2, ("c_attn", "c_fc", "wte")), "c": (3, ("c_proj",))},
    ),  # fmt: skip
    (
        "bert",
        tiny_bert,
        {
            "a": (4, ("query", "value")),
            "b": (6, ("dense",)),
            "c": (2, ("query", "word_embeddings")),
        },
    ),  # fmt: skip
]
ROWS = ["a", None, "b", "c", "a", "b", None]


def _model(make: Callable[[], nn.Module], adapters: dict[str, tuple]) -> nn.Module:
    model = make()
    for i, (name, (rank, targets)) in enumerate(adapters.items()):
        config = lorakit.LoraConfig(rank=rank, alpha=2.0 * (i + 1), targets=targets)
        lorakit.inject(model, config, adapter_name=name)
    lorakit.set_active(model, list(adapters))  # all trainable, as routed training needs
    randomise_lora(model, std=0.2)
    return model.eval()


def _tokens(batch: int) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randint(0, VOCAB, (batch, 6))


def _alone(model: nn.Module, ids: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
    """The reference: each row on its own, with only its adapter active (or none)."""
    outs = []
    for i, name in enumerate(rows):
        if name is None:
            with lorakit.disabled(model):
                outs.append(model(ids[i : i + 1]).logits)
        else:
            lorakit.set_active(model, name)
            outs.append(model(ids[i : i + 1]).logits)
    return torch.cat(outs)


@pytest.mark.parametrize(("make", "adapters"), [m[1:] for m in MODELS], ids=[m[0] for m in MODELS])
def test_rows_equal_single_adapter_runs(make, adapters) -> None:
    model = _model(make, adapters)
    ids = _tokens(len(ROWS))
    with torch.no_grad():
        want = _alone(model, ids, ROWS)
        lorakit.set_active(model, ["a", "b", "c"])  # routing ignores what is active
        with lorakit.routing(model, ROWS):
            got = model(ids).logits
            again = model(ids).logits  # second call: cached stacks
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    assert not torch.allclose(want[0], want[1], atol=1e-3)  # adapters change the outputs
    assert all(layer.lora_routing is None for _, layer in lorakit.lora_layers(model))


def test_all_rows_none_is_the_base_and_one_adapter_is_that_adapter() -> None:
    model = _model(tiny_llama, MODELS[0][2])
    ids = _tokens(3)
    with torch.no_grad():
        with lorakit.disabled(model):
            base = model(ids).logits
        lorakit.set_active(model, "b")
        only_b = model(ids).logits
        with lorakit.routing(model, [None] * 3):
            torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
        with lorakit.routing(model, ["b"] * 3):
            torch.testing.assert_close(model(ids).logits, only_b, rtol=0, atol=ATOL)


def test_gradients_flow_to_each_rows_adapter_only() -> None:
    model = _model(tiny_llama, MODELS[0][2])
    ids = _tokens(2)
    with lorakit.routing(model, ["a", None]):
        model(ids).logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".lora." in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".lora.a." in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".lora.a." not in n)
    # and they equal the gradient of row 0 alone through adapter "a"
    want = {n: g.clone() for n, g in grads.items() if ".lora.a." in n}
    model.zero_grad()
    lorakit.set_active(model, "a")
    model(ids[:1]).logits.sum().backward()
    for n, g in want.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[n].grad, atol=ATOL, rtol=1e-4)


def test_plain_module_and_any_leading_shape() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("0", "2")), adapter_name="x")
    lorakit.inject(model, lorakit.LoraConfig(rank=5, targets=("2",)), adapter_name="y")
    randomise_lora(model, std=0.3)
    rows = ["y", "x", None, "x"]
    for shape in [(4, 6), (4, 2, 3, 6)]:
        x = torch.randn(shape)
        want = []
        for i, name in enumerate(rows):
            if name is None:
                with lorakit.disabled(model):
                    want.append(model(x[i : i + 1]))
            else:
                lorakit.set_active(model, name)
                want.append(model(x[i : i + 1]))
        with lorakit.routing(model, rows):
            torch.testing.assert_close(model(x), torch.cat(want), rtol=0, atol=ATOL)


def test_dropout_rows_train_with_their_own_rate() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=("0",), dropout=0.5), "drop")
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=("0",)), "keep")
    randomise_lora(model)
    model.train()
    x = torch.randn(2, 3, 64)
    with lorakit.routing(model, ["drop", "keep"]):
        y = model(x)
    lorakit.set_active(model, "keep")
    torch.testing.assert_close(y[1:], model(x[1:]), rtol=0, atol=ATOL)  # no dropout on row 1
    lorakit.set_active(model, "drop")
    with torch.no_grad():
        model.eval()
        assert not torch.allclose(y[:1], model(x[:1]), atol=1e-4)  # row 0 was dropped out


def test_bad_routing_inputs() -> None:
    model = _model(tiny_llama, MODELS[0][2])
    ids = _tokens(3)
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['zzz'\]"):
        with lorakit.routing(model, ["a", "zzz", None]):
            pass
    with pytest.raises(AdapterError, match=r"adapters_per_row is empty"):
        with lorakit.routing(model, []):
            pass
    with pytest.raises(AdapterError, match=r"routing has 2 rows but a layer got input of shape"):
        with lorakit.routing(model, ["a", "b"]):
            model(ids)
    with lorakit.routing(model, ["a"] * 3):
        with pytest.raises(AdapterError, match=r"routing contexts do not nest"):
            with lorakit.routing(model, ["b"] * 3):
                pass
    lorakit.set_active(model, "a")
    lorakit.merge(model)
    with pytest.raises(AdapterError, match=r"while \['a'\] are merged"):
        with lorakit.routing(model, ["a"] * 3):
            pass
    assert all(layer.lora_routing is None for _, layer in lorakit.lora_layers(model))


class _PlusOne:
    """A `RoutingHook` that adds 1 to the base output and records the layers that call it."""

    def __init__(self) -> None:
        self.layers: list[nn.Module] = []

    def add_delta(self, layer: lorakit.LoraLayer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.layers.append(layer)
        return y + 1


@pytest.mark.parametrize("base", [nn.Linear(5, 3), nn.Embedding(7, 3)], ids=["linear", "embedding"])
def test_a_routing_hook_replaces_the_active_adapters(base: nn.Module) -> None:
    """With `lora_routing` set, forward is the hook's add_delta(layer, x, base(x)), on the fused
    Linear path's layers too."""
    model = nn.Sequential(base)
    lorakit.inject(model, lorakit.LoraConfig(targets=("0",)))
    randomise_lora(model, std=0.2)  # a non-zero delta, which the hook must replace
    layer = model[0]
    x = torch.randn(2, 5) if isinstance(base, nn.Linear) else torch.tensor([[1, 6]])
    hook: RoutingHook = _PlusOne()
    layer.lora_routing = hook
    with lorakit.disabled(model):
        want = layer(x) + 1
    assert torch.equal(layer(x), want) and hook.layers == [layer]


def test_conv_layers_are_refused_clearly() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    lorakit.inject(model, lorakit.LoraConfig(targets=("0",)))
    with pytest.raises(UnsupportedLayerError, match=r"'0' is a LoRAConv2d"):
        with lorakit.routing(model, ["default"]):
            pass


def test_reused_stacks_follow_changes_to_the_adapters() -> None:
    from lorakit.routing import _REUSED, clear_cache

    model = _model(tiny_llama, MODELS[0][2])
    ids = _tokens(len(ROWS))
    with torch.no_grad():
        want = _alone(model, ids, ROWS)
        for _ in range(2):  # built once, then reused
            with lorakit.routing(model, ROWS, reuse_stacks=True):
                torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=ATOL)
        assert len(_REUSED) > 0
        layer = model.model.layers[0].self_attn.q_proj
        layer.lora["b"].lora_B.mul_(3.0)  # an in-place change bumps the version: rebuilt
        want = _alone(model, ids, ROWS)
        with lorakit.routing(model, ROWS, reuse_stacks=True):
            torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=ATOL)
    clear_cache(model)
    assert not any(layer in _REUSED for _, layer in lorakit.lora_layers(model))


def test_matches_peft_mixed_batch(tmp_path) -> None:
    """The same adapters through PEFT's `adapter_names=` path give the same rows."""
    import peft

    model = _model(tiny_llama, MODELS[0][2])
    for name in ("a", "b", "c"):
        lorakit.save_adapter(model, tmp_path, adapter_name=name)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    for name in ("b", "c"):
        peft_model.load_adapter(tmp_path / name, adapter_name=name)
    peft_model.eval()
    ids = _tokens(len(ROWS))
    with torch.no_grad():
        want = peft_model(ids, adapter_names=[n or "__base__" for n in ROWS]).logits
        with lorakit.routing(model, ROWS):
            torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=ATOL)
