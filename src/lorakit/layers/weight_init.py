"""Inits that read the base weight W (out, in), PEFT's `init_lora_weights` of the same names.

    pissa           W = U S V^T:  B = U_r sqrt(S_r / s),  A = sqrt(S_r / s) V_r^T
    pissa_niter_K   the same from torch.svd_lowrank(W, r, niter=K) (random: global generator)
    olora           W = Q R:      B = Q[:, :r],  A = R[:r]
    mica            B = U[:, -r:] (the least singular directions),  A = 0;  B stays frozen

PiSSA and OLoRA then move the adapter's share out of the base, W <- W - s B A (the residual
base, computed in float32 with the adapter's stored factors, PEFT's order of operations), so
the model's output is unchanged at init. The first factors, A0 and B0, stay on the adapter
(`initial_A` / `initial_B`, buffers outside the state dict) for `save_adapter(...,
for_original_base=True)`: s B A - s B0 A0 = s [B, -B0] [A; A0] is a plain LoRA of rank 2r on
the original W. "orthogonal" needs no weight (see `LoRA.reset_parameters`).

Where PEFT has them: Linear and GPT-2 Conv1D (in the (out, in) view; PEFT's OLoRA forgets to
transpose a Conv1D weight), MiCA also on Embedding. Convolutions (PEFT: "Unknown
initialization") and quantized weights (PEFT: "Please initialize PiSSA under float32 ...")
are refused, and so are embeddings for the others (PEFT silently uses its default there).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import PISSA_NITER, LoraConfig
from ..errors import AdapterError, ConfigError, UnsupportedLayerError

FLOAT_WEIGHTS = (torch.float32, torch.float16, torch.bfloat16)  # PEFT's list


def moves_base(init: str) -> bool:
    """Whether `init` rewrites the base weight to the residual W - s B0 A0 (PiSSA, OLoRA)."""
    return init.startswith("pissa") or init == "olora"


def reads_weight(init: str) -> bool:
    """Whether `init` computes the factors from the base weight."""
    return moves_base(init) or init == "mica"


def _kind(cls: type[nn.Module], module: nn.Module) -> str:
    """ "embedding", "conv" or "linear" (Linear, GPT-2 Conv1D and quantized linears)."""
    if getattr(cls, "is_embedding", False):
        return "embedding"
    return "conv" if cls.lora_dims(module)[2] else "linear"  # type: ignore[attr-defined]


def check_init_on_layer(cls: type[nn.Module], module: nn.Module, config: LoraConfig) -> None:
    """Refuse `config.init` on `module` (to be adapted by LoRA class `cls`) where PEFT refuses
    it or lorakit cannot reproduce it; checked for every target before any weight changes."""
    init = config.init
    if init == "loftq":  # its own checks: lorakit.loftq
        from ..loftq import check_loftq

        return check_loftq(cls, config.use_dora)
    if not reads_weight(init) and init != "orthogonal":
        return
    if not isinstance(module._parameters.get("weight"), torch.Tensor):
        raise UnsupportedLayerError(  # e.g. nn.MultiheadAttention (PEFT fails there too)
            f"init={init!r} supports Linear, GPT-2 Conv1D and Embedding layers, not "
            f"{type(module).__name__}"
        )
    kind = _kind(cls, module)
    if init == "orthogonal":
        if config.rank % 2:
            raise ConfigError(f"init='orthogonal' needs an even rank, got rank={config.rank}")
        if kind != "linear":
            raise UnsupportedLayerError(f"init='orthogonal' supports Linear layers, not {kind}")
    if not reads_weight(init):
        return
    if config.use_dora and init == "mica":
        raise ConfigError("init='mica' cannot be combined with use_dora (PEFT refuses it too)")
    if kind == "conv" or (kind == "embedding" and init != "mica"):
        allowed = "Linear and Embedding" if init == "mica" else "Linear"
        raise UnsupportedLayerError(f"init={init!r} supports {allowed} layers, not {kind}")
    weight = module.weight
    if getattr(cls, "is_quantized", False) or weight.dtype not in FLOAT_WEIGHTS:
        hint = ": initialise the full model, then quantize the residual" if moves_base(init) else ""
        raise UnsupportedLayerError(
            f"init={init!r} needs a float32, float16 or bfloat16 base weight, got "
            f"{type(module).__name__} with {weight.dtype}{hint}"
        )
    in_features, out_features, _ = cls.lora_dims(module)  # type: ignore[attr-defined]
    if config.rank > min(in_features, out_features):
        raise ConfigError(
            f"init={init!r} needs rank <= min(in, out) = {min(in_features, out_features)}, "
            f"got rank={config.rank}"
        )
    others = list(getattr(module, "lora", {}))
    if others and moves_base(init):
        raise AdapterError(
            f"init={init!r} rewrites the base weight, which adapters {others} on this layer "
            "use too; add it to a bare model, or load its for_original_base=True save"
        )


def check_untied(model: nn.Module, targets: list[tuple[str, nn.Module]], init: str) -> None:
    """Refuse a base-moving init on a weight another module shares (e.g. a tied lm_head):
    the residual would change that module's output too. LoftQ rewrites it too (NF4 round trip)."""
    if not moves_base(init) and init != "loftq":
        return
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            users.setdefault(id(weight), []).append(name)
    for name, module in targets:
        shared = [n for n in users.get(id(module.weight), []) if n != name]
        if shared:
            raise UnsupportedLayerError(
                f"init={init!r} rewrites the weight of {name!r}, which is tied to {shared}; "
                "untie the weights first"
            )


def factors(init: str, matrix: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """(A, B) of `init` for the float32 `matrix` (out, in), as PEFT computes them."""
    if init == "olora":
        Q, R = torch.linalg.qr(matrix)
        return R[:rank].contiguous(), Q[:, :rank].contiguous()
    if init == "mica":
        U = torch.linalg.svd(matrix, full_matrices=False)[0]
        return matrix.new_zeros(rank, matrix.shape[1]), U[:, -rank:].contiguous()
    found = PISSA_NITER.fullmatch(init)
    if found is None:  # full SVD
        V, S, Uh = torch.linalg.svd(matrix, full_matrices=False)
        Vr, Sr, Uhr = V[:, :rank], S[:rank], Uh[:rank]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(matrix, rank, niter=int(found.group(1)))
        Uhr = Ur.t()
    Sr = Sr / scale
    return torch.diag(torch.sqrt(Sr)) @ Uhr, Vr @ torch.diag(torch.sqrt(Sr))


def apply_weight_init(layer: nn.Module, adapter: nn.Module) -> None:
    """Fill `adapter` (a LoRA of `layer`) from the layer's weight per `adapter.init`; PiSSA and
    OLoRA also rewrite the weight to the residual and keep A0, B0 (see the module docstring).
    A meta weight is left alone (the factors come from a file then)."""
    init, weight = adapter.init, layer.weight
    if not reads_weight(init) or weight.is_meta:
        return
    with torch.no_grad():
        matrix = layer.to_weight_layout(weight).to(torch.float32)  # (out, in): a transpose or not
        A, B = factors(init, matrix, adapter.rank, adapter.scaling)
        adapter.lora_A.copy_(A)
        adapter.lora_B.copy_(B)
        if not moves_base(init):
            return
        A0, B0 = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
        residual = matrix - adapter.scaling * B0.to(torch.float32) @ A0.to(torch.float32)
        weight.copy_(layer.to_weight_layout(residual))
        adapter.initial_A, adapter.initial_B = A0, B0


def undo_weight_init(layer: nn.Module, adapter: nn.Module) -> None:
    """Add s B0 A0 back into the weight (exact up to rounding): `inject`'s undo on failure."""
    if getattr(adapter, "initial_A", None) is None:
        return
    with torch.no_grad():
        delta = adapter.scaling * adapter.initial_B.float() @ adapter.initial_A.float()
        layer.weight.add_(layer.to_weight_layout(delta).to(layer.weight.dtype))
