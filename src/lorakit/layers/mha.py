"""LoRA for `nn.MultiheadAttention`, as PEFT does it: on the packed in-projection and out_proj.

MHA reads `in_proj_weight` (3E, E) and `out_proj.weight` directly (through
`F.multi_head_attention_forward`) and never calls `out_proj.forward`, so adapting `out_proj` as a
Linear would change nothing. Targeting the MHA module adapts both, as PEFT does: this layer holds
the in-projection's adapters (A (r, E), B (3E, r)) and `targets.find_targets` adapts `out_proj`
beside it, with the same adapter name and the MHA's rank and alpha. Each forward then computes

    in_proj_weight + sum s B A  (this layer's active, unmerged adapters, in turn)
    out_proj.weight + sum s B A (out_proj's)

and shows them to the base forward in place of the two parameters (PEFT merges before each
forward and unmerges after). Everything else (merge, unmerge, disable, delete, save) is the
generic per-layer code, the two layers each doing their part.

One difference: PEFT 0.21 adds out_proj's delta twice (its MHA merge writes W + dW into
out_proj, then calls out_proj.merge(), which adds dW again through `.data`, so the gradient
sees one); huggingface/peft#3774 fixes it. lorakit adds it once, the LoRA math.

As in PEFT: the adapters' dropout is not applied (the deltas go into the weights, not the
input; a warning says so), query, key and value must share embed_dim (the packed in-projection),
and DoRA and mixed-adapter batches are refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import UnsupportedLayerError
from ..functional import merged_weight
from .base import LoraLayer
from .lora import LoRA

OUT_PROJ = "out_proj"


class MultiheadAttentionLoraMixin(LoraLayer):
    """Mixin: LoRA on an MHA's packed in-projection; its out_proj is adapted beside it."""

    @property
    def weight(self) -> Tensor:
        """The packed (3E, E) in-projection: the weight this layer's adapters change."""
        return self.in_proj_weight

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        return self.embed_dim, 3 * self.embed_dim, ()

    def _build_adapter(self, name: str, config: LoraConfig) -> LoRA:
        if config.dropout > 0:
            warnings.warn(
                f"adapter {name!r}: dropout={config.dropout} is not applied on "
                f"nn.MultiheadAttention (its deltas are added to the weights, as in PEFT)",
                UserWarning,
                stacklevel=4,
            )
        return super()._build_adapter(name, config)

    def forward(self, *args: object, **kwargs: object) -> tuple[Tensor, Tensor | None]:
        """The base MHA forward with both projections' active, unmerged deltas added."""
        out_proj = getattr(self, OUT_PROJ)
        shown = [(self, "in_proj_weight", adapted_weight(self))]
        if isinstance(out_proj, LoraLayer):
            shown.append((out_proj, "weight", adapted_weight(out_proj)))
        with _showing([(m, n, w) for m, n, w in shown if w is not None]):
            return self.base_class.forward(self, *args, **kwargs)


class LoRAMultiheadAttention(MultiheadAttentionLoraMixin, nn.MultiheadAttention):
    """An `nn.MultiheadAttention` with LoRA on its in-projection; parameter names unchanged."""

    base_class = nn.MultiheadAttention


def adapted_weight(layer: LoraLayer) -> Tensor | None:
    """`layer.weight` plus each active, unmerged adapter's s B A in turn (PEFT's order), or
    None when nothing is added (disabled, all merged, or a routing context: see `routing`)."""
    if layer.lora_disabled or layer.lora_routing is not None:
        return None
    names = [n for n in layer.lora_active if n not in layer.lora_merged]
    if not names:
        return None
    weight = layer.weight
    for name in names:
        weight = merged_weight(weight, layer.delta_weight(name))
    return weight


@contextmanager
def _showing(replacements: list[tuple[nn.Module, str, Tensor]]) -> Iterator[None]:
    """Within the block `module.<name>` reads the given tensor instead of the parameter.

    An instance attribute shadows the registered parameter (nn.Module looks parameters up only
    when normal lookup fails), so the parameter itself, its state dict entry and optimizer
    state stay untouched, and the gradient reaches A and B through the tensor.
    """
    for module, name, tensor in replacements:
        module.__dict__[name] = tensor
    try:
        yield
    finally:
        for module, name, _ in replacements:
            module.__dict__.pop(name, None)


def check_attention(module: nn.MultiheadAttention) -> None:
    """Refuse an MHA whose in-projection is not packed (kdim or vdim != embed_dim), as PEFT."""
    if not module._qkv_same_embed_dim:
        raise UnsupportedLayerError(
            f"cannot adapt {type(module).__name__} with kdim={module.kdim}, vdim={module.vdim} "
            f"and embed_dim={module.embed_dim}: LoRA adapts the packed in-projection, which "
            "needs kdim == vdim == embed_dim (as in PEFT)"
        )


def out_proj_owners(targets: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """{out_proj path: its MHA's path} for each MHA among `targets`: the out_proj adapter
    takes the MHA's rank and alpha, and PEFT's keys name it under the MHA."""
    return {
        f"{path}.{OUT_PROJ}": path
        for path, module in targets
        if isinstance(module, nn.MultiheadAttention)
    }


def peft_module_path(path: str, owners: dict[str, str]) -> str:
    """The module path in PEFT's keys: PEFT wraps the MHA, so its out_proj sits under
    `<mha>.base_layer.out_proj`."""
    owner = owners.get(path)
    return path if owner is None else f"{owner}.base_layer.{OUT_PROJ}"
