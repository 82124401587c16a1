"""`LoraConfig(lora_bias=True)` and grouped convs inside lorakit: merges, the fused path,
routing, the refusals (PEFT's own comparisons are in test_bias_groups_peft.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_lora, tiny_mlp
from torch import nn

import lorakit
from lorakit.cli import build_parser
from lorakit.cli.finetune import options_from_args
from lorakit.errors import ConfigError, MergeError, UnsupportedLayerError
from lorakit.layers import LoraLayer, lora_class
from lorakit.spectrum import factor_svd

ATOL = 1e-5
pytestmark = [
    pytest.mark.filterwarnings("ignore:lora_bias=True on a"),
    pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed"),  # PEFT's warning
]


def _x() -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


def _nudge(model: nn.Module, seed: int = 3) -> None:
    """Every adapter tensor random (randomise_lora leaves B's bias at zero)."""
    randomise_lora(model, std=0.2, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_bias"):
                p.copy_(torch.randn(p.shape, generator=generator))


def _biased(*names: str, targets: tuple[str, ...] = ("fc1", "fc2")) -> nn.Module:
    model = tiny_mlp()
    for i, name in enumerate(names):
        config = lorakit.LoraConfig(rank=2 + i, alpha=5.0, targets=targets, lora_bias=i == 0)
        lorakit.inject(model, config, adapter_name=name)
    lorakit.set_active(model, list(names))
    _nudge(model)
    return model.eval()


def test_bias_is_zero_at_start_and_adds_s_times_b() -> None:
    model = tiny_mlp()
    base = model(_x())
    lorakit.inject(model, lorakit.LoraConfig(rank=2, alpha=6.0, targets=("fc1",), lora_bias=True))
    adapter = model.fc1.lora["default"]
    assert torch.equal(adapter.lora_bias, torch.zeros(16)) and adapter.lora_bias.requires_grad
    torch.testing.assert_close(model(_x()), base, rtol=0, atol=0)
    with torch.no_grad():
        adapter.lora_bias.fill_(1.0)
    x = _x()
    want = F.linear(x, model.fc1.weight, model.fc1.bias) + 3.0  # s = 6 / 2, B = 0
    torch.testing.assert_close(model.fc1(x), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("keep_original", [True, False])
def test_merge_adds_s_b_to_the_base_bias_and_unmerge_takes_it_out(keep_original: bool) -> None:
    model = _biased("a", "b")
    x = _x()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(x)
        lorakit.merge(model, keep_original=keep_original)
        adapter = model.fc1.lora["a"]
        assert not torch.allclose(model.fc1.bias, weights["fc1.bias"])
        torch.testing.assert_close(model.fc1.bias, weights["fc1.bias"] + adapter.scaling
                                   * adapter.lora_bias, rtol=0, atol=1e-6)  # fmt: skip
        torch.testing.assert_close(model(x), want, rtol=0, atol=ATOL)
        lorakit.unmerge(model)
    for key, value in model.state_dict().items():
        if keep_original:
            assert torch.equal(value, weights[key]), key  # bit for bit
        else:
            torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6)


def test_unmerging_one_adapter_keeps_the_others_bias() -> None:
    model = _biased("a", "b")
    bias = model.fc1.bias.detach().clone()
    model.fc1.merge()
    model.fc1.unmerge(("b",))
    adapter = model.fc1.lora["a"]
    assert torch.equal(model.fc1.bias, (bias + adapter.lora_bias * adapter.scaling).detach())
    model.fc1.unmerge()
    assert torch.equal(model.fc1.bias, bias)


def test_disabled_leaves_out_the_merged_bias() -> None:
    model = _biased("a")
    base = tiny_mlp()
    lorakit.merge(model)
    with torch.no_grad(), lorakit.disabled(model):
        torch.testing.assert_close(model(_x()), base(_x()), rtol=0, atol=0)


@pytest.mark.parametrize("base_bias", [True, False])
def test_fused_path_equals_the_plain_path(base_bias: bool) -> None:
    """The fused op adds s * b into its bias: same output and gradients (A, B, b) as the plain
    `LoraLayer.forward`, which never fuses."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6, bias=base_bias)
    layer = lora_class(base).adapt(base)
    layer.requires_grad_(False)
    for i, name in enumerate(("a", "b", "c")):
        config = lorakit.LoraConfig(rank=2, alpha=3.0, lora_bias=i != 1)
        layer.add_adapter(name, config)
    _nudge(layer)
    x = torch.randn(4, 8)
    results = []
    for forward in (type(layer).forward, LoraLayer.forward):
        assert layer._fused_adapters(x) or forward is LoraLayer.forward
        out = forward(layer, x)
        params = [p for p in layer.parameters() if p.requires_grad]
        results.append((out, torch.autograd.grad(out.square().sum(), params)))
    (fused, fused_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fused, plain, rtol=0, atol=ATOL)
    assert len(fused_grads) == 8  # A and B of three adapters, b of two; W frozen
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=ATOL)


def test_routing_rows_equal_single_adapter_runs_with_lora_bias_and_dora() -> None:
    model = _biased("a", "b")
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("fc1",), use_dora=True), "d")
    _nudge(model, seed=4)
    model.eval()
    rows = ["a", None, "b", "d", "a"]
    x = torch.randn(len(rows), 8, generator=torch.Generator().manual_seed(2))
    want = []
    with torch.no_grad():
        for i, name in enumerate(rows):
            if name is None:
                with lorakit.disabled(model):
                    want.append(model(x[i : i + 1]))
            else:
                lorakit.set_active(model, name)
                want.append(model(x[i : i + 1]))
        with lorakit.routing(model, rows):
            got = model(x)
    torch.testing.assert_close(got, torch.cat(want), rtol=0, atol=ATOL)


def test_no_base_bias_warns_and_refuses_to_merge() -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with pytest.warns(UserWarning, match=r"lora_bias=True on a LoRALinear without a bias"):
        lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("0",), lora_bias=True))
    with pytest.raises(MergeError, match=r"has lora_bias=True and the base layer has no bias"):
        lorakit.merge(model)
    assert model[0].lora_merged == ()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lora_bias": True, "use_dora": True}, r"lora_bias=True is not supported with use_dora"),
        ({"lora_bias": True, "init": "gaussian"}, r"not supported with init='gaussian'"),
        ({"lora_bias": 1}, r"lora_bias must be a bool, got 1"),
    ],
)
def test_config_refusals(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        lorakit.LoraConfig(**options)


def test_embedding_refuses_lora_bias_and_nothing_changes() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    config = lorakit.LoraConfig(targets=("0", "1"), lora_bias=True)
    with pytest.raises(UnsupportedLayerError, match=r"lora_bias=True is not supported on "
                       r"LoRAEmbedding layers \(PEFT refuses it on embeddings too\)"):  # fmt: skip
        lorakit.inject(model, config)
    assert type(model[0]) is nn.Embedding and type(model[1]) is nn.Linear


def _grouped(rank: int = 4, **options: object) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, groups=4, padding_mode="reflect"))
    lorakit.inject(model, lorakit.LoraConfig(rank=rank, targets=("0",), **options))
    _nudge(model)
    return model


def test_grouped_conv_rank_must_be_a_multiple_of_groups() -> None:
    with pytest.raises(ConfigError, match=r"rank=6 is not a multiple of the conv's groups=4"):
        _grouped(rank=6)


def test_grouped_delta_weight_is_the_ungrouped_kernel_of_the_adapter() -> None:
    """B A with B expanded block-diagonally, as an ungrouped conv, computes the adapter's term;
    its SVD (inspect --spectrum, compress) is that of this kernel."""
    layer = _grouped(lora_bias=True)[0]
    adapter = layer.lora["default"]
    assert adapter.lora_B.shape == (12, 1, 1, 1)
    x = torch.randn(2, 8, 5, 5)
    delta = layer.delta_weight("default")
    assert delta.shape == (12, 8, 3, 3)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    want = F.conv2d(padded, delta, adapter.lora_bias * adapter.scaling)
    torch.testing.assert_close(layer.lora_delta(adapter, x), want, rtol=0, atol=ATOL)
    svd = factor_svd(adapter.lora_A, adapter.lora_B, adapter.scaling)
    values = torch.linalg.svdvals(delta.flatten(1).double())
    torch.testing.assert_close(svd.S, values[:4], rtol=1e-5, atol=1e-5)
    assert values[4:].abs().max() < 1e-5  # rank 4


def test_grouped_conv_refuses_merge_and_nothing_changes() -> None:
    model = _grouped(use_dora=True)
    before = copy.deepcopy(model.state_dict())
    for merge in (lorakit.merge, lorakit.merge_and_unload):
        with pytest.raises(MergeError, match=r"layer '0': cannot merge adapter 'default' into "
                           r"LoRAConv2d with groups=4: its update B A is an ungrouped kernel"):
            merge(model)
    with pytest.raises(MergeError, match=r"groups=4"):
        model[0].merge()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("make", "call", "match"),
    [
        (_biased, lambda m: lorakit.compress(m, "a", 1), r"adapter 'a' has lora_bias=True"),
        (_grouped, lambda m: lorakit.compress(m, "default", 1),
         r"layer '0' is a conv with groups=4; adapter algebra works on ungrouped layers only"),
        (_grouped, lambda m: lorakit.combine(m, ["default"], [1.0], method="cat"),
         r"groups=4; adapter algebra"),
    ],
)  # fmt: skip
def test_adapter_algebra_refuses(make, call, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call(make() if make is _grouped else make("a"))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: _biased("a"), r"lora_bias=True; compress works on plain LoRA adapters only"),
        (_grouped, r"'0' is a grouped conv \(lora_B \(12, 1, 1, 1\)\); compress works on"),
    ],
)
def test_compress_adapter_folder_refuses(make, match: str, tmp_path: Path) -> None:
    model = make()
    name = lorakit.adapter_names(model)[0]
    lorakit.save_adapter(model, tmp_path / "in", adapter_name=name)
    with pytest.raises(ConfigError, match=match):
        lorakit.compress_adapter(tmp_path / "in", 1, tmp_path / "out", adapter_name=name)


def test_inspect_spectrum_reads_a_grouped_conv_adapter(tmp_path: Path, capsys) -> None:
    from lorakit.cli import main
    from lorakit.spectrum_report import adapter_spectrum

    model = _grouped(lora_bias=True)
    lorakit.save_adapter(model, tmp_path)
    (layer,) = adapter_spectrum(tmp_path)
    want = torch.linalg.svdvals(model[0].delta_weight("default").flatten(1).double())[:4]
    got = torch.tensor(layer.singular_values, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert main(["inspect", str(tmp_path), "--spectrum"]) == 0
    assert f"{want[0].item():.4g}"[:4] in capsys.readouterr().out  # the top singular value


def test_finetune_flag_lora_bias() -> None:
    parser = build_parser()
    assert options_from_args(parser.parse_args(["finetune", "--lora-bias"]))[1].lora_bias
    assert not options_from_args(parser.parse_args(["finetune"]))[1].lora_bias


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_lora_bias_matches_peft_and_merge_and_unload_keeps_it(
    kind: str, tmp_path: Path
) -> None:
    """PEFT's bitsandbytes layers take lora_bias too: its file loads to its outputs, and
    `merge_and_unload` (full precision) adds s * b, also where the base had no bias."""
    import bitsandbytes as bnb
    import peft
    from qlora_models import IN, quantized_mlp

    from lorakit.layers.dequantize import keep_trainable_layout

    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["0", "2"], lora_bias=True)
    ref = peft.get_peft_model(quantized_mlp(kind), config)
    for module in ref.modules():  # the base forward lorakit runs (no CPU inference repacking)
        if isinstance(module, bnb.nn.Linear4bit):
            keep_trainable_layout(module)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    ref.save_pretrained(tmp_path)
    model = lorakit.from_pretrained(quantized_mlp(kind), tmp_path)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.eval()(x)
        torch.testing.assert_close(model.eval()(x), want, rtol=0, atol=ATOL)
        merged = lorakit.merge_and_unload(model)
        assert merged[2].bias is not None  # the base had none: it holds s * b
        tolerance = 0.05 if kind == "int8" else 1e-4  # the quantized forward rounds
        torch.testing.assert_close(merged(x), want, rtol=tolerance, atol=tolerance)
