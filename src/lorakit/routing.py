"""Mixed-adapter batches: each row of a batch goes through its own adapter, or none.

Inside `with routing(model, ["a", None, "b", "a"]):` every adapted layer computes, for row i,

    y_i = base(x_i) + s_{a_i} * B_{a_i} A_{a_i} x_i          (nothing added where a_i is None)

in tensor ops: per layer, the routed adapters' factors are stacked once (ranks zero-padded
to the largest, a zero adapter at index 0 for `None` rows), gathered per row by index, and
applied with two batched matmuls — h^T = bmm(A_rows, x^T) scaled per row by s, then
`baddbmm_(h, B_rows^T)` into the base output — no Python loop over rows or adapters.
A row of a DoRA adapter gets y_i = f_i * (base(x_i) - b + s B A x_i) + b, its factor
f = m / ||W + s B A|| stacked per adapter like the factors (ones for LoRA adapters). A row
of an adapter with `lora_bias` also gets s * b (zeros stacked for the adapters without).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import adapter_names
from .errors import AdapterError, UnsupportedLayerError
from .layers.base import LoraLayer
from .layers.conv import ConvLoraMixin
from .layers.dora import DoRA, weight_rows
from .layers.mha import MultiheadAttentionLoraMixin
from .layers.trainable_tokens import TrainableTokensMixin
from .tree import lora_layers

__all__ = ["RowRouting", "clear_cache", "routing"]


class _Stacks(NamedTuple):
    """One layer's routed factors: index 0 is the zero adapter, i + 1 its i-th adapter.

    a: (n+1, r*in) flat A (for an embedding: the (n+1)*vocab x r lookup table); b: (n+1,
    r*out) flat B^T; ranks zero-padded to the largest, r. Flat rows make `index_select` copy
    long contiguous runs (gathering (r, in) blocks with r = 8 is several times slower), and
    B^T gathered contiguous is the layout `baddbmm_` runs fastest on.
    """

    rows: Tensor  # (batch,) this layer's stack index of each row
    scale: Tensor  # (batch, 1, 1) s of each row's adapter
    keep: Tensor  # (batch, 1, 1) 1 - dropout p of each row's adapter
    a: Tensor
    b: Tensor
    rank: int
    dora: Tensor | None = None  # (batch, 1, out) each row's DoRA factor, None without DoRA
    bias: Tensor | None = None  # (batch, 1, out) each row's s * b (lora_bias), or None


class _Factors(NamedTuple):
    """A layer's factors of some adapters, stacked: `index` maps a name to its position."""

    index: dict[str, int]
    a: Tensor  # (n+1, r*in), or for an embedding the ((n+1)*vocab, r) table
    b: Tensor  # (n+1, r*out): B^T
    per_adapter: Tensor  # (n+1, 2): scale s and keep probability 1 - p of each adapter
    rank: int
    signature: tuple
    dora: Tensor | None  # (n+1, out): each adapter's DoRA factor (ones for LoRA), or None
    bias: Tensor | None = None  # (n+1, out): each adapter's s * b (zeros without), or None


def _signature(layer: LoraLayer, names: tuple[str, ...]) -> tuple:
    """What the stacks depend on: each factor's storage, version, dtype, device; s; p."""
    parts: list[object] = [names]
    for n in names:
        ad = layer.lora[n]
        for p in (ad.lora_A, ad.lora_B):
            parts.append((p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape)))
        parts.append((ad.scaling, ad.dropout_p))
        if ad.lora_bias is not None:
            p = ad.lora_bias
            parts.append((p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape)))
        if isinstance(ad, DoRA):  # its factor depends on m and on W
            for p in (ad.magnitude, layer.weight):
                parts.append((p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape)))
    return tuple(parts)


def _stack(layer: LoraLayer, names: tuple[str, ...], signature: tuple = ()) -> _Factors:
    """Stack the factors of `names` (all on `layer`); index 0 is the zero adapter."""
    adapters = [layer.lora[n] for n in names]
    rank = max(a.rank for a in adapters)
    # Zero rows of A / columns of B pad every rank to the largest: they add exact zeros.
    a_list = [_pad(a.lora_A.flatten(1), 0, rank) for a in adapters]
    b_list = [_pad(a.lora_B.reshape(a.out_features, a.rank).t(), 0, rank) for a in adapters]
    a_stack = torch.stack([torch.zeros_like(a_list[0]), *a_list])  # (n+1, r, in)
    b_stack = torch.stack([torch.zeros_like(b_list[0]), *b_list])  # (n+1, r, out)
    if layer.is_embedding:  # row i * vocab + id of the table is column id of A_i
        a_stack = a_stack.transpose(1, 2).reshape(-1, rank)
    per_adapter = torch.tensor(
        [[0.0, 1.0]] + [[ad.scaling, 1.0 - ad.dropout_p] for ad in adapters],
        dtype=a_stack.dtype, device=a_stack.device,
    )  # fmt: skip
    index = {n: i + 1 for i, n in enumerate(names)}
    dora = _dora_factors(layer, adapters, a_stack.dtype)
    bias = _bias_terms(adapters, a_stack.dtype)
    return _Factors(
        index, a_stack.flatten(1), b_stack.flatten(1), per_adapter, rank, signature, dora, bias
    )


def _bias_terms(adapters: list, dtype: torch.dtype) -> Tensor | None:
    """(n+1, out): s * b of each adapter with lora_bias, zeros for the rest and row 0."""
    if all(a.lora_bias is None for a in adapters):
        return None
    zeros = adapters[0].lora_B.new_zeros(adapters[0].out_features, dtype=dtype)
    terms = [zeros if a.lora_bias is None else (a.lora_bias * a.scaling).to(dtype)
             for a in adapters]  # fmt: skip
    return torch.stack([zeros, *terms])


def _dora_factors(layer: LoraLayer, adapters: list, dtype: torch.dtype) -> Tensor | None:
    """(n+1, out): f = m / ||W + s B A|| of each DoRA adapter, ones for the rest and row 0."""
    if not any(isinstance(a, DoRA) for a in adapters):
        return None
    weight = layer.weight  # unmerged: routing refuses merged layers
    rows = weight_rows(layer, weight)
    ones = torch.ones(adapters[0].out_features, dtype=dtype, device=weight.device)
    fs = [a.factor(weight, rows).reshape(-1).to(dtype) if isinstance(a, DoRA) else ones
          for a in adapters]  # fmt: skip
    return torch.stack([ones, *fs])


# Stacks of every adapter of a layer, kept between contexts with `reuse_stacks=True`; weak
# keys, so they go with the layer.
_REUSED: weakref.WeakKeyDictionary[LoraLayer, _Factors] = weakref.WeakKeyDictionary()


def _reused(layer: LoraLayer) -> _Factors:
    names = tuple(layer.lora)
    signature = _signature(layer, names)
    factors = _REUSED.get(layer)
    if factors is None or factors.signature != signature:
        with torch.no_grad():
            factors = _REUSED[layer] = _stack(layer, names, signature)
    return factors


def clear_cache(model: nn.Module | None = None) -> None:
    """Free the stacks `routing(..., reuse_stacks=True)` keeps (of `model`, or all)."""
    if model is None:
        _REUSED.clear()
        return
    for _, layer in lora_layers(model):
        _REUSED.pop(layer, None)


class RowRouting:
    """Which adapter each row uses, and the per-layer stacks built from it: the
    `RoutingHook` (`lorakit.layers.routing_hook`) each routed layer's `lora_routing` holds.

    Attributes:
        names: the adapters that some row uses, in first-use order.
        rows: (batch,) long; 0 for "no adapter", i + 1 for names[i].
        reuse: keep stacks of all adapters between contexts (see `routing`).
    """

    def __init__(self, names: tuple[str, ...], rows: Tensor, reuse: bool = False) -> None:
        self.names = names
        self.rows = rows
        self.reuse = reuse
        # Per layer, kept while grad is off (no graph attached), so repeated forward calls
        # in one context (e.g. generation) stack only once.
        self._cache: dict[int, _Stacks] = {}

    def __repr__(self) -> str:
        return f"RowRouting(names={self.names}, rows={self.rows.tolist()})"

    def _stacks(self, layer: LoraLayer) -> _Stacks | None:
        """This layer's stacks, or None when no routed adapter sits on it."""
        key = id(layer)
        if key in self._cache:
            return self._cache[key]
        here = tuple(n for n in self.names if n in layer.lora)
        if not here:
            return None
        grad = torch.is_grad_enabled()
        factors = _reused(layer) if self.reuse and not grad else _stack(layer, here)
        # this layer's stack index of each routed name (0 when the name is not on this layer)
        remap = torch.tensor([0] + [factors.index.get(n, 0) for n in self.names])
        rows = remap[self.rows].to(factors.a.device)
        per_row = factors.per_adapter[rows].view(-1, 2, 1, 1)
        dora = None if factors.dora is None else factors.dora[rows].unsqueeze(1)
        bias = None if factors.bias is None else factors.bias[rows].unsqueeze(1)
        stacks = _Stacks(
            rows, per_row[:, 0], per_row[:, 1], factors.a, factors.b, factors.rank, dora, bias
        )
        if not grad:
            self._cache[key] = stacks
        return stacks

    def add_delta(self, layer: LoraLayer, x: Tensor, y: Tensor) -> Tensor:
        """y + the per-row deltas of `layer` for input x (rows along dim 0)."""
        batch = self.rows.shape[0]
        if x.shape[0] != batch:
            raise AdapterError(
                f"routing has {batch} rows but a layer got input of shape {tuple(x.shape)}; "
                "the batch must be dim 0 of every adapted layer's input"
            )
        st = self._stacks(layer)
        if st is None:
            return y
        if st.dora is not None and layer.training:
            self._check_dora_dropout(layer)
        if layer.is_embedding:
            h = _embedding_h(x, st)
        else:
            h = _linear_ht(x.to(st.a.dtype), st, layer.training).transpose(1, 2)
        h = h * st.scale  # (batch, T, r), each row scaled by its adapter's s
        out = y.shape[-1]
        bt = torch.index_select(st.b, 0, st.rows).view(batch, st.rank, out)
        y3 = y.reshape(batch, -1, out)
        if st.dora is not None or st.bias is not None:
            return _combined(layer, y, y3, torch.bmm(h, bt), st)
        if y.dtype == h.dtype and y3.data_ptr() == y.data_ptr() and not _needs_graph(y, h, bt):
            y3.baddbmm_(h, bt)  # in place: no second (batch, T, out) tensor
            return y
        return y + torch.bmm(h, bt).reshape(y.shape).to(y.dtype)

    def _check_dora_dropout(self, layer: LoraLayer) -> None:
        """PEFT's DoRA with dropout in training rescales W drop(x): not routed (per row)."""
        routed = [(n, layer.lora[n]) for n in self.names if n in layer.lora]
        dropping = [n for n, a in routed if isinstance(a, DoRA) and a.dropout_p > 0]
        if dropping:
            raise AdapterError(
                f"mixed-adapter batches do not route DoRA adapter(s) {dropping} with dropout "
                "in training mode; call model.eval() or route them without dropout"
            )


def _combined(layer: LoraLayer, y: Tensor, y3: Tensor, delta: Tensor, st: _Stacks) -> Tensor:
    """y plus the rows' deltas with lora biases (s * b) and DoRA factors: f * (y - b + delta
    + s * b_lora) + b, each row its own f (ones for LoRA) and b_lora (zeros without)."""
    if st.bias is not None:
        delta = delta + st.bias
    if st.dora is None:
        return y + delta.reshape(y.shape).to(y.dtype)
    bias = getattr(layer, "bias", None)
    plain = y3 if bias is None else y3 - bias
    new = st.dora * (plain + delta)
    new = new if bias is None else new + bias
    return new.reshape(y.shape).to(y.dtype)


def _pad(t: Tensor, dim: int, size: int) -> Tensor:
    """`t` with zeros appended along `dim` (0 or 1 of a 2-d tensor) up to `size`."""
    missing = size - t.shape[dim]
    return F.pad(t, (0, missing) if dim == 1 else (0, 0, 0, missing)) if missing else t


def _needs_graph(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _linear_ht(x: Tensor, st: _Stacks, training: bool) -> Tensor:
    """(A_{a_i} drop(x_i)^T) for every row: (batch, r, T), with x (batch, ..., in)."""
    batch = st.rows.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1])
    if training and bool((st.keep < 1).any()):
        x3 = x3 * (torch.rand_like(x3) < st.keep) / st.keep  # each row its adapter's dropout
    a = torch.index_select(st.a, 0, st.rows).view(batch, st.rank, x3.shape[-1])
    return torch.bmm(a, x3.transpose(1, 2))


def _embedding_h(ids: Tensor, st: _Stacks) -> Tensor:
    """A_{a_i}^T[ids_i] for every row: (batch, T, r); one lookup in all tables side by side."""
    batch = st.rows.shape[0]
    vocab = st.a.shape[0] // (st.b.shape[0])
    table = st.a.view(-1, st.rank)  # ((n+1) * vocab, r)
    flat = ids.reshape(batch, -1) + st.rows.view(batch, 1) * vocab
    return F.embedding(flat, table)


@contextmanager
def routing(
    model: nn.Module, adapters_per_row: Sequence[str | None], *, reuse_stacks: bool = False
) -> Iterator[nn.Module]:
    """Within the block, row i of every batch uses adapter `adapters_per_row[i]` (None: base).

    The batch is dim 0 of each adapted layer's input, as in transformers models ((B, T, d)
    hidden states, (B, T) token ids). Active adapters are ignored meanwhile; outputs equal
    running each row alone with only its adapter active. Works for Linear, GPT-2 Conv1D and
    Embedding layers, with any mix of ranks.

    reuse_stacks: under `torch.no_grad()`, keep each layer's stacked factors of *all* its
        adapters between contexts (one extra copy of the adapters' memory; `clear_cache`
        frees it), so a new batch only gathers. Stacks are rebuilt when a factor changes
        through PyTorch (in-place ops bump its version; new storage, dtype or device) — but
        not after writes through `.data`, which PyTorch does not track: call `clear_cache`.

    Raises:
        AdapterError: an unknown adapter name, merged adapters, an empty list, a nested
            routing context, or (at forward) a DoRA adapter with dropout in training mode.
        UnsupportedLayerError: a routed adapter sits on a convolution or an
            nn.MultiheadAttention (its deltas go into weights shared by all rows).
    """
    rows = list(adapters_per_row)
    if not rows:
        raise AdapterError("adapters_per_row is empty; give one adapter name (or None) per row")
    known = adapter_names(model)
    unknown = sorted({str(n) for n in rows if n is not None and n not in known})
    if unknown:
        raise AdapterError(f"adapters_per_row names unknown adapter(s) {unknown}; the model has "
                           f"{list(known)}")  # fmt: skip
    names = tuple(dict.fromkeys(n for n in rows if n is not None))
    layers = list(lora_layers(model))
    for path, layer in layers:
        if layer.lora_merged:
            raise AdapterError(
                f"cannot route rows while {list(layer.lora_merged)} are merged (layer {path!r}); "
                "call lorakit.unmerge(model) first"
            )
        if layer.lora_routing is not None:
            raise AdapterError(f"layer {path!r} is already routed; routing contexts do not nest")
        unroutable = (ConvLoraMixin, MultiheadAttentionLoraMixin, TrainableTokensMixin)
        if isinstance(layer, unroutable) and any(n in layer.lora for n in names):
            raise UnsupportedLayerError(
                f"mixed-adapter batches support Linear, GPT-2 Conv1D and Embedding layers; "
                f"{path!r} is a {type(layer).__name__}"
            )
    index = {n: i + 1 for i, n in enumerate(names)}
    state = RowRouting(
        names, torch.tensor([0 if n is None else index[n] for n in rows]), reuse_stacks
    )
    try:
        for _, layer in layers:
            layer.lora_routing = state
        yield model
    finally:
        for _, layer in layers:
            layer.lora_routing = None
