"""`ExpertLoRA`: the factors of LoRA on a raw parameter, one rank-r pair per expert.

PEFT's `lora.ParamWrapper` layout, so adapter files match key for key and tensor for tensor:
a parameter of E experts (a 3-D stack; E = 1 for a 2-D parameter) takes

    lora_A (r * E, in)     rows e*r .. e*r + r - 1 are expert e's A_e (r, in)
    lora_B (out, r * E)    column k*E + e is column k of expert e's B_e (out, r)

(B is interleaved, A is blocked: PEFT's reshapes, kept as they are). The scale is alpha / r,
not alpha / (r * E): every expert is a rank-r LoRA of its own matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import Init, scaling
from .lora import LoRA, _check_scale


class ExpertLoRA(LoRA):
    """E rank-r adapters of one (E, out, in) stack (or one (out, in) matrix when E = 1).

    `delta_weight()` is s * B_e A_e for every expert e: (E, out, in). It never sees an input:
    the adapted parameter is replaced by W + delta while its module runs (see
    `lorakit.layers.parameter`), which is also why dropout is not possible here.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        *,
        num_experts: int,
        use_rslora: bool = False,
        init: Init = "kaiming",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # the factors are one LoRA of rank r * E; kaiming's fan-in (in) is the same
        super().__init__(in_features, out_features, rank * num_experts, alpha,
                         use_rslora=use_rslora, init=init, device=device, dtype=dtype)  # fmt: skip
        self.rank = rank
        self.num_experts = num_experts
        self.scaling = scaling(rank, self.alpha, use_rslora)
        _check_scale(self.scaling, dtype or torch.get_default_dtype())

    def expert_factors(self) -> tuple[Tensor, Tensor]:
        """(B_e, A_e) of every expert: (E, out, r) and (E, r, in)."""
        e = self.num_experts
        a = self.lora_A.reshape(e, self.rank, self.lora_A.shape[-1])
        b = self.lora_B.reshape(self.lora_B.shape[0], self.rank, e).permute(2, 0, 1)
        return b, a

    def delta_weight(self) -> Tensor:
        """s * B_e A_e for every expert: (E, out, in)."""
        b, a = self.expert_factors()
        return torch.bmm(b, a) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        raise TypeError(
            "an ExpertLoRA adapts a parameter, not an input: its module computes with W + delta"
        )

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, {super().extra_repr()}"
