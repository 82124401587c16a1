"""`LoRA`: the low-rank delta s * B(A(drop(x))), the seed's `lora_delta` as a module."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import Init, check_alpha, check_dropout, check_init, check_rank, scaling
from ..errors import ConfigError
from ..functional import delta_weight, linear_delta


def _check_scale(scale: float, dtype: torch.dtype) -> None:
    """A scale the adapter's dtype cannot hold makes even a fresh adapter output inf * 0."""
    if dtype.is_floating_point and scale > torch.finfo(dtype).max:
        raise ConfigError(
            f"the scale alpha / rank = {scale:g} overflows the adapter dtype {dtype}; "
            "lower alpha or use a wider dtype"
        )


def check_groups(rank: int, groups: int) -> int:
    """PEFT's rule for a grouped conv: B splits the rank channels evenly among the groups."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ConfigError(f"groups must be a positive integer, got {groups!r}")
    if rank % groups:
        raise ConfigError(
            f"rank={rank} is not a multiple of the conv's groups={groups}: LoRA on a grouped "
            "conv (as PEFT) splits the rank evenly among the groups; pick a rank divisible by "
            f"{groups} (rank_pattern can set it for this layer) or do not target it"
        )
    return groups


class LoRA(nn.Module):
    """The low-rank adapter delta(x) = s * B(A(drop(x))), with s = alpha / rank.

    Parameters follow PEFT's shapes: `lora_A` (rank, in, *kernel), `lora_B` (out, rank, *ones).
    B starts at zero, so a fresh adapter outputs exact zeros (A and B swap roles for
    embeddings, as in PEFT: A zero, B random).

    Args:
        in_features: input size (vocabulary size for an embedding, channels for a conv).
        out_features: output size.
        rank: r, default 8. alpha: default 16.0. dropout: on the input, default 0.
        use_rslora: s = alpha / sqrt(rank). init: "kaiming" | "gaussian" | "zeros".
        kernel_size: a conv's kernel, () for a linear map.
        embedding: swap the init of A and B (PEFT's embedding rule).
        groups: a grouped conv's groups (PEFT): B is then a grouped pointwise conv,
            (out, rank / groups, *ones); rank must be a multiple of groups.
        lora_bias: a trainable bias on B, `lora_bias` (out,), starting at zero (PEFT's
            `lora_bias`, saved as `lora_B.bias`): delta(x) = s * (B(A(drop(x))) + b).

    Raises:
        ConfigError: an option is invalid; the message names it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        alpha: float = 16.0,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: Init = "kaiming",
        kernel_size: tuple[int, ...] = (),
        embedding: bool = False,
        groups: int = 1,
        lora_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_rank(in_features, "input_size")
        check_rank(out_features, "output_size")
        self.rank = check_rank(rank)
        self.alpha = check_alpha(alpha)
        self.init = check_init(init)
        self.use_rslora = use_rslora
        self.embedding = embedding
        self.scaling = scaling(self.rank, self.alpha, use_rslora)
        _check_scale(self.scaling, dtype or torch.get_default_dtype())
        p = check_dropout(dropout)
        # nn.Identity rather than Dropout(0): nothing to do, and it prints as what it is.
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        factory = {"device": device, "dtype": dtype}
        ones = (1,) * len(kernel_size)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, *kernel_size, **factory))
        self.groups = check_groups(rank, groups)
        self.lora_B = nn.Parameter(torch.empty(out_features, rank // groups, *ones, **factory))
        self.lora_bias = nn.Parameter(torch.empty(out_features, **factory)) if lora_bias else None
        # A0 and B0 of an init that moved s B0 A0 out of the base (see layers.weight_init)
        self.register_buffer("initial_A", None, persistent=False)
        self.register_buffer("initial_B", None, persistent=False)
        self.reset_parameters()

    @property
    def dropout_p(self) -> float:
        """The dropout probability on the input (0 without dropout), in train and eval mode."""
        return float(self.dropout.p) if isinstance(self.dropout, nn.Dropout) else 0.0

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    @property
    def frozen_B(self) -> bool:
        """MiCA trains A only: B keeps the base's least singular directions (PEFT's rule)."""
        return self.init == "mica"

    def requires_grad_(self, requires_grad: bool = True) -> LoRA:
        """nn.Module's, except that a frozen B (`frozen_B`) never trains."""
        super().requires_grad_(requires_grad)
        if self.frozen_B:
            self.lora_B.requires_grad_(False)
        return self

    def reset_parameters(self) -> None:
        """Re-initialise: one factor random, the other zero, so delta(x) = 0. Inits that read
        the base weight start at zero here; the layer fills them (`layers.weight_init`)."""
        if self.init == "orthogonal" or self.init.startswith("pissa_niter_"):
            self._draw_as_peft_builds()  # so a seeded model gets PEFT's random numbers
        if self.init == "orthogonal":
            return self._orthogonal()
        random, zero = (self.lora_B, self.lora_A) if self.embedding else (self.lora_A, self.lora_B)
        nn.init.zeros_(zero)
        if self.lora_bias is not None:
            nn.init.zeros_(self.lora_bias)
        # "zeros" and the weight-reading inits start at zero; "loftq" starts as "kaiming" and
        # the layer then fits it to its weight (lorakit.loftq)
        if self.init not in ("kaiming", "gaussian", "loftq"):
            nn.init.zeros_(random)
        elif self.init == "gaussian":
            nn.init.normal_(random, std=0.02)  # Edifice's init
        elif self.embedding:
            nn.init.normal_(random)  # PEFT's embedding init
        else:
            nn.init.kaiming_uniform_(random, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init

    def _draw_as_peft_builds(self) -> None:
        """Draw from the global generator what PEFT's `nn.Linear(in, r)` and `nn.Linear(r, out)`
        draw when it builds A and B (kaiming-uniform, float32, CPU) before a random init."""
        torch.empty(self.rank, self.in_features).uniform_()
        torch.empty(self.out_features, self.rank).uniform_()

    def _orthogonal(self) -> None:
        """PEFT's "orthogonal" init, draw for draw from the global generator: the odd and even
        rows of a random orthogonal r x r matrix Q span A and B, so B A = 0 (up to rounding)."""
        r = self.rank
        if r % 2:
            raise ConfigError(f"init='orthogonal' needs an even rank, got rank={r}")
        Q = torch.linalg.qr(torch.randn(r, r))[0]
        A = torch.randn(self.in_features, r // 2).mm(Q[0::2, :]).T / 10.0
        B = torch.randn(r // 2, self.out_features).T.mm(Q[1::2, :]) / 10.0
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)

    def forward(self, x: Tensor) -> Tensor:
        """s * B(A(drop(x))): (..., in_features) -> (..., out_features)."""
        x = self.dropout(x.to(self.lora_A.dtype))
        y = linear_delta(x, self.lora_A, self.lora_B, self.scaling)
        return y if self.lora_bias is None else y + self.lora_bias * self.scaling

    def delta_weight(self) -> Tensor:
        """s * B A: (out, in, *kernel); the ungrouped update for a grouped B."""
        return delta_weight(self.lora_A, self.lora_B, self.scaling)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"
            + (f", groups={self.groups}" if self.groups != 1 else "")
            + (", lora_bias=True" if self.lora_bias is not None else "")
        )
