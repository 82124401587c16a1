"""Hypothesis strategies for the property suite: random adaptable layers, inputs and adapters.

A `LayerSpec` is plain data (so hypothesis can print and shrink it); `build` and `make_input`
turn it into a seeded layer and input, so two calls give identical tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig

# Sizes that catch off-by-ones and layout mix-ups: 1, small, odd, prime.
SIZES = st.sampled_from([1, 2, 3, 5, 7, 11])
LINEAR_KINDS = ("linear", "gpt2")
CONV_KINDS = {"conv1d": (1, nn.Conv1d), "conv2d": (2, nn.Conv2d), "conv3d": (3, nn.Conv3d)}
KINDS = (*LINEAR_KINDS, "embedding", *CONV_KINDS)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class LayerSpec:
    """One adaptable layer and the shape of its input.

    kind: "linear", "gpt2" (transformers' Conv1D), "embedding" or "conv1d/2d/3d".
    batch: leading dims of the input (for a conv: () unbatched or (n,)); spatial: a conv's
    input size per dim. For an embedding `in_dim` is the vocabulary, `out_dim` the width.
    """

    kind: str
    in_dim: int
    out_dim: int
    bias: bool
    batch: tuple[int, ...]
    seed: int
    padding_idx: int | None = None
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"
    spatial: tuple[int, ...] = ()

    @property
    def linear_like(self) -> bool:
        return self.kind in LINEAR_KINDS

    def build(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The base layer in `dtype`, weights from `seed` (and a non-zero GPT-2 bias)."""
        torch.manual_seed(self.seed)
        if self.kind == "linear":
            layer = nn.Linear(self.in_dim, self.out_dim, bias=self.bias)
        elif self.kind == "gpt2":
            layer = Conv1D(self.out_dim, self.in_dim)  # nf=out, nx=in; weight (in, out)
            nn.init.normal_(layer.weight, std=0.3)
            nn.init.normal_(layer.bias, std=0.3)  # Conv1D starts at zero; make it count
        elif self.kind == "embedding":
            layer = nn.Embedding(self.in_dim, self.out_dim, padding_idx=self.padding_idx)
        else:
            cls = CONV_KINDS[self.kind][1]
            layer = cls(
                self.in_dim,
                self.out_dim,
                self.kernel,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                bias=self.bias,
                padding_mode=self.padding_mode,
            )
        return layer.to(dtype)

    def make_input(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The layer's input: float (..., in) / (n, C, *spatial), or ids for an embedding."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        if self.kind == "embedding":
            ids = torch.randint(0, self.in_dim, self.batch, generator=gen)
            if self.padding_idx is not None and ids.numel():
                ids.view(-1)[0] = self.padding_idx % self.in_dim  # hit the padding row
            return ids
        if self.linear_like:
            shape = (*self.batch, self.in_dim)
        else:
            shape = (*self.batch, self.in_dim, *self.spatial)
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _batch(max_dims: int) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(st.sampled_from([1, 2, 3, 5, 0]), max_size=max_dims).map(tuple)


@st.composite
def _conv_spec(draw: st.DrawFn, kind: str, base: dict) -> LayerSpec:
    dims = CONV_KINDS[kind][0]
    small = st.integers(1, 3) if dims < 3 else st.integers(1, 2)
    kernel = tuple(draw(small) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding: tuple[int, ...] | str = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    if all(s == 1 for s in stride) and draw(st.booleans()):
        padding = "same"  # torch pads asymmetrically for an even kernel span
    mode = draw(st.sampled_from(PADDING_MODES)) if padding == "same" or any(padding) else "zeros"
    spatial = []
    for i, (k, d) in enumerate(zip(kernel, dilation)):
        reach = d * (k - 1) + 1  # the kernel's span; the padded input must cover it
        p = reach if padding == "same" else padding[i]  # non-zero modes need p < size
        spatial.append(max(reach - 2 * p, p + 1, 1) + draw(st.integers(0, 2)))
    batch = draw(st.sampled_from([(), (1,), (2,), (3,)]))  # () is an unbatched input
    return LayerSpec(
        kind,
        base["in_dim"],
        base["out_dim"],
        base["bias"],
        batch,
        base["seed"],
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        padding_mode=mode,
        spatial=tuple(spatial),
    )


@st.composite
def layer_specs(draw: st.DrawFn, kinds: tuple[str, ...] = KINDS) -> LayerSpec:
    """A random adaptable layer with an input of random batch shape."""
    kind = draw(st.sampled_from(kinds))
    base = {
        "in_dim": draw(SIZES),
        "out_dim": draw(SIZES),
        "bias": kind == "gpt2" or draw(st.booleans()),  # Conv1D always has a bias
        "seed": draw(st.integers(0, 2**16)),
    }
    if kind in CONV_KINDS:
        return draw(_conv_spec(kind, base))
    if kind == "embedding":
        vocab = base["in_dim"]
        pad = draw(st.none() | st.integers(-vocab, vocab - 1))
        batch = draw(_batch(3))
        return LayerSpec(kind, vocab, base["out_dim"], False, batch, base["seed"], pad)
    # Up to 125 tokens: enough for the fused path to fold into W' (fused.merge_pays).
    batch = draw(_batch(3))
    return LayerSpec(kind, base["in_dim"], base["out_dim"], base["bias"], batch, base["seed"])


@dataclass(frozen=True)
class AdapterSpec:
    """Options of one adapter; `dtype` None follows the base layer's dtype."""

    rank: int
    alpha: float
    use_rslora: bool
    init: str
    dtype: torch.dtype | None
    bias: str = "none"
    dropout: float = 0.0
    pattern_rank: int | None = None  # rank_pattern / alpha_pattern override for the layer
    pattern_alpha: float | None = None

    def config(self) -> LoraConfig:
        return LoraConfig(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            rank_pattern={} if self.pattern_rank is None else {"0": self.pattern_rank},
            alpha_pattern={} if self.pattern_alpha is None else {"0": self.pattern_alpha},
            use_rslora=self.use_rslora,
            init=self.init,
            dtype=self.dtype,
            bias=self.bias,
            targets=("0",),
        )


def adapter_specs(
    dtypes: tuple[torch.dtype | None, ...] = (None, torch.float32),
    bias_modes: tuple[str, ...] = ("none",),
) -> st.SearchStrategy[AdapterSpec]:
    return st.builds(
        AdapterSpec,
        rank=st.sampled_from([1, 2, 3, 7, 16]),  # 16: more than any layer's width here
        alpha=st.sampled_from([0.5, 1.0, 3.0, 16.0]),
        use_rslora=st.booleans(),
        init=st.sampled_from(["kaiming", "gaussian", "zeros"]),
        dtype=st.sampled_from(dtypes),
        bias=st.sampled_from(bias_modes),
        dropout=st.sampled_from([0.0, 0.25]),  # models run in eval mode: dropout is off
        pattern_rank=st.none() | st.sampled_from([1, 4]),
        pattern_alpha=st.none() | st.sampled_from([2.0, 7.5]),
    )


def adapter_lists(**kwargs: object) -> st.SearchStrategy[list[AdapterSpec]]:
    return st.lists(adapter_specs(**kwargs), min_size=1, max_size=3)


def names(adapters: list[AdapterSpec]) -> list[str]:
    return [f"a{i}" for i in range(len(adapters))]


def adapted(spec: LayerSpec, dtype: torch.dtype, adapters: list[AdapterSpec]) -> nn.Module:
    """nn.Sequential(base layer) with every adapter injected and all of them active, in eval
    mode (dropout off: the properties compare deterministic outputs)."""
    model = nn.Sequential(spec.build(dtype))
    for name, adapter in zip(names(adapters), adapters):
        lorakit.inject(model, adapter.config(), adapter_name=name)
    lorakit.set_active(model, names(adapters))
    return model.eval()


def randomise(model: nn.Module, seed: int, std: float = 0.4) -> None:
    """Give every adapter random A and B, so each delta is non-zero (merged == adapted is then
    a real check)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for adapter in layer.lora.values():
                for p in (adapter.lora_A, adapter.lora_B):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)
