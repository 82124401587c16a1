"""Which LoRA class adapts which layer: a short table from base type to mixin."""

from __future__ import annotations

import sys
from functools import cache

from torch import nn

from ..errors import UnsupportedLayerError
from .base import LoraLayer
from .conv import ConvLoraMixin, LoRAConv1d, LoRAConv2d, LoRAConv3d
from .embedding import EmbeddingLoraMixin, LoRAEmbedding
from .linear import LinearLoraMixin, LoRALinear
from .mha import LoRAMultiheadAttention, MultiheadAttentionLoraMixin, check_attention

# Exact base class -> the named (importable, picklable) LoRA class.
LORA_CLASSES: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: LoRALinear,
    nn.Embedding: LoRAEmbedding,
    nn.Conv1d: LoRAConv1d,
    nn.Conv2d: LoRAConv2d,
    nn.Conv3d: LoRAConv3d,
    nn.MultiheadAttention: LoRAMultiheadAttention,
}
# Base family -> mixin, for subclasses of a supported type.
_MIXINS: list[tuple[type[nn.Module] | tuple[type[nn.Module], ...], type[LoraLayer]]] = [
    (nn.Linear, LinearLoraMixin),
    (nn.Embedding, EmbeddingLoraMixin),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), ConvLoraMixin),  # not _ConvNd: transposed convs differ
    (nn.MultiheadAttention, MultiheadAttentionLoraMixin),
]

try:  # GPT-2's Conv1D, when transformers is installed
    from transformers.pytorch_utils import Conv1D

    from .gpt2 import GPT2Conv1DLoraMixin, LoRAGPT2Conv1D

    LORA_CLASSES[Conv1D] = LoRAGPT2Conv1D
    _MIXINS.insert(0, (Conv1D, GPT2Conv1DLoraMixin))
except ImportError:  # pragma: no cover - transformers is an extra
    pass

_QUANTIZED_REGISTERED = False


def _register_quantized() -> None:
    """Add bitsandbytes' quantized linears once bitsandbytes is imported.

    Lazily: importing bitsandbytes takes seconds, and a model can only hold its layers once
    something imported it, so `import lorakit` never does.
    """
    global _QUANTIZED_REGISTERED
    if _QUANTIZED_REGISTERED or "bitsandbytes" not in sys.modules:
        return
    _QUANTIZED_REGISTERED = True
    from .quantized import QUANTIZED_CLASSES, QUANTIZED_MIXINS

    LORA_CLASSES.update(QUANTIZED_CLASSES)
    _MIXINS[:0] = QUANTIZED_MIXINS


LINEAR_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t, m in _MIXINS if issubclass(m, LinearLoraMixin)
)


def lora_class(module: nn.Module) -> type[LoraLayer]:
    """The LoRA class that adapts `module`, or UnsupportedLayerError naming its type."""
    cls = type(module)
    if isinstance(module, LoraLayer):
        return cls
    _register_quantized()
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise UnsupportedLayerError(
            f"cannot adapt an uninitialised lazy layer {cls.__name__}: run one forward pass first"
        )
    if cls in LORA_CLASSES:
        found = LORA_CLASSES[cls]
    else:
        found = next((_subclass(m, cls) for t, m in _MIXINS if isinstance(module, t)), None)
    if found is None:
        supported = ", ".join(sorted(t.__name__ for t in LORA_CLASSES))
        raise UnsupportedLayerError(
            f"cannot adapt a layer of type {cls.__name__}: LoRA supports {supported}"
        )
    if issubclass(found, EmbeddingLoraMixin) and getattr(module, "max_norm", None) is not None:
        raise UnsupportedLayerError(
            f"cannot adapt {cls.__name__} with max_norm={module.max_norm}: the base renormalises "
            "its rows, so the adapted and merged outputs would differ"
        )
    if issubclass(found, LinearLoraMixin) and isinstance(module, nn.Linear):
        _check_plain_weight(module, found)
    if issubclass(found, MultiheadAttentionLoraMixin):
        check_attention(module)
    return found


def _check_plain_weight(module: nn.Linear, found: type[LoraLayer]) -> None:
    """A Linear subclass lorakit has no quantized support for must hold a float (out, in)
    weight: a packed or integer one (another library's quantized layer) would fail at
    forward time with a shape error, or merge into codes."""
    if getattr(found, "is_quantized", False):
        return
    weight = module.weight
    expected = (module.out_features, module.in_features)
    if tuple(weight.shape) != expected or not weight.dtype.is_floating_point:
        raise UnsupportedLayerError(
            f"cannot adapt a layer of type {type(module).__name__}: its weight is "
            f"{tuple(weight.shape)} {weight.dtype}, not a float {expected} weight (a quantized "
            "layer?); LoRA supports bitsandbytes' Linear4bit and Linear8bitLt among quantized "
            "layers"
        )


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of `module`'s weight as the model sees it: a bitsandbytes 4-bit weight's
    original shape, not its packed codes', so quantized and full bases give one shape."""
    if isinstance(module, nn.MultiheadAttention):  # its adapted weight: the in-projection
        return tuple(module.in_proj_weight.shape)
    state = getattr(module.weight, "quant_state", None)
    shape = getattr(state, "shape", None)
    return tuple(shape) if shape is not None else tuple(module.weight.shape)


@cache
def _subclass(mixin: type[LoraLayer], base: type[nn.Module]) -> type[LoraLayer]:
    """LoRA class for a subclass of a supported type; keeps the subclass's own forward."""
    namespace = {"base_class": base, "__reduce_ex__": _reduce_subclass}
    return type(f"LoRA{base.__name__}", (mixin, base), namespace)


def _reduce_subclass(self: LoraLayer, protocol: int) -> tuple:
    # A class made by `_subclass` cannot be found by name, so pickle says how to remake it.
    cls = type(self)
    return _new_subclass, (cls.__bases__[0], cls.base_class), self.__getstate__()


def _new_subclass(mixin: type[LoraLayer], base: type[nn.Module]) -> LoraLayer:
    """An empty instance of `_subclass(mixin, base)`; pickle then restores its state."""
    cls = _subclass(mixin, base)
    return cls.__new__(cls)
