"""`LoraConfig`: every LoRA option in one frozen dataclass, validated once."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NoReturn, get_args

import torch

from .errors import ConfigError
from .names import name_matches
from .token_indices import TokenIndices, check_token_indices

Bias = Literal["none", "all", "lora_only"]
Init = Literal["kaiming", "gaussian", "zeros", "loftq", "pissa", "olora", "orthogonal", "mica"]
# PiSSA by fast randomised SVD with K subspace iterations (PEFT's "pissa_niter_[K]"), also an init.
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
ALL_LINEAR = "all-linear"

# Dtypes adapters can be initialised and computed in (float8 kernels lack both).
ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Largest alpha accepted: the scale alpha / rank multiplies every adapter output, so a huge
# one turns a fresh adapter's 0 into inf * 0 = NaN; real configs use alpha <= a few hundred.
ALPHA_MAX = 1e6


def check_rank(rank: object, option: str = "rank") -> int:
    """Return `rank` if it is a positive int, else raise ConfigError naming `option`."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"{option} must be a positive integer, got {rank!r}")
    return rank


def check_alpha(alpha: object, option: str = "alpha") -> float:
    """Return `alpha` as a float if it is a positive finite number up to `ALPHA_MAX`, else
    raise ConfigError naming `option`."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConfigError(f"{option} must be a positive finite number, got {alpha!r}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"{option} must be a positive finite number, got {alpha!r}")
    if alpha > ALPHA_MAX:
        raise ConfigError(
            f"{option} must be at most {ALPHA_MAX:g} (the scale alpha / rank multiplies every "
            f"adapter output), got {alpha!r}"
        )
    return float(alpha)


def check_dropout(p: object, option: str = "dropout") -> float:
    """Return `p` if 0 <= p < 1, else raise ConfigError."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ConfigError(f"{option} must be a number in [0, 1), got {p!r}")
    return float(p)


def check_choice(value: object, option: str, choices: Sequence[str]) -> str:
    """Return `value` if it is one of `choices`, else raise ConfigError listing them."""
    if value not in choices:
        raise ConfigError(f"{option} must be one of {list(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_init(value: object) -> str:
    """Return `value` if it is an `Init` name or "pissa_niter_K" (K >= 0), else ConfigError."""
    if isinstance(value, str) and PISSA_NITER.fullmatch(value):
        return value
    if value not in get_args(Init):
        raise ConfigError(
            f"init must be one of {list(get_args(Init))} or 'pissa_niter_K' (K an integer >= 0), "
            f"got {value!r}"
        )
    return value  # type: ignore[return-value]


def scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The LoRA scale: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def suffix_regex(key: str) -> str:
    """The regex a `rank_pattern` / `alpha_pattern` key is matched as: the key, or "." + key at
    the end of a module path. Validation compiles exactly this, so a key that only fails once
    embedded (a global flag like "(?i)" not at the start) is caught in `LoraConfig`."""
    return rf"(.*\.)?(?:{key})"


def pattern_key(patterns: Mapping[str, object], module_name: str) -> str | None:
    """The first key of `patterns` that matches the end of `module_name` (PEFT's rule).

    A key matches when `module_name` is the key, or ends with "." + key; keys are regexes.
    """
    for key in patterns:
        if name_matches(module_name, suffix_regex(key)):
            return key
    return None


def _as_tuple(value: object, option: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ConfigError(f"{option} must be a list of module names, got {value!r}")


class FrozenDict(dict):
    """A dict that refuses changes, so a frozen config's patterns (and hash) stay as validated.

    Still a dict for equality, `json.dumps` and `dataclasses.asdict`; hashes by its items;
    pickles and copies by value. Change a config with `dataclasses.replace`.
    """

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("a LoraConfig pattern is read-only; use dataclasses.replace(config, ...)")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self) -> tuple:
        return type(self), (dict(self),)


def _as_patterns(value: object, option: str) -> dict:
    """A copy of a {suffix regex: value} mapping (None is empty), its keys checked."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise ConfigError(f"{option} must map module name suffixes to values, got {value!r}")
    for key in value:
        _compile(suffix_regex(key), option, shown=key)
    return dict(value)


def _as_dtype(value: object) -> torch.dtype | None:
    if value is None:
        return None
    dtype = value if isinstance(value, torch.dtype) else getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch dtype or its name, got {value!r}")
    if dtype not in ADAPTER_DTYPES:
        names = [str(d).removeprefix("torch.") for d in ADAPTER_DTYPES]
        raise ConfigError(f"dtype must be one of {names} (or None), got {value!r}")
    return dtype


@dataclass(frozen=True)
class LoraConfig:
    """Options of one LoRA adapter, validated in `__post_init__`.

    Scale s = alpha / rank (or alpha / sqrt(rank) with `use_rslora`); y = W x + s * B A x.

    Args:
        rank: inner dimension r of A (r x in) and B (out x r). Default 8.
        alpha: numerator of the scale, in (0, ALPHA_MAX = 1e6]. Default 16.0.
        dropout: dropout on the adapter's input, in [0, 1). Default 0.
        targets: module names or name suffixes (a list), one regex matched against the whole
            module path (a str), or "all-linear" (every Linear / GPT-2 Conv1D but the output head).
        exclude: names or suffixes (a list) or a regex (a str) never adapted.
        rank_pattern / alpha_pattern: {suffix regex: value} overrides per module; each key is
            compiled here as it is matched (`suffix_regex`). Kept as read-only `FrozenDict`s.
        use_rslora: scale by alpha / sqrt(rank).
        bias: "none", "all" (every bias trains) or "lora_only" (biases of adapted layers train).
        modules_to_save: modules (names or suffixes) trained in full, e.g. a classifier head.
        init: "kaiming" (PEFT: A kaiming-uniform, B zero), "gaussian" (Edifice: A ~ N(0, 0.02),
            B zero) or "zeros" (both zero; for loading). Embeddings swap A and B (PEFT).
            "loftq": A and B from the SVD of the base weight's NF4 quantization error, the
            weight replaced by its NF4 round trip (Linear layers; see `lorakit.loftq`).
            From the base weight (PEFT's names, see `lorakit.layers.weight_init`): "pissa" and
            "pissa_niter_K" (principal singular directions; K fast-SVD iterations), "olora"
            (QR) - both move s * B A out of the base weight, which becomes the residual -,
            "mica" (least singular directions, B frozen) and "orthogonal" (B A = 0, even rank).
        dtype: adapter parameter dtype: float16, bfloat16, float32 (the default) or float64;
            None follows the base layer.
        use_dora: DoRA (PEFT's name): a trainable magnitude per output row rescales the
            normalised W + s * B A (see `lorakit.layers.dora`); every layer type lorakit adapts.
        lora_bias: a trainable bias on B (PEFT's name; saved as `lora_B.bias`): each adapted
            layer adds s * (B A x + b), and merging adds s * b to the base bias. Not with
            DoRA, the "gaussian" or "loftq" init (PEFT refuses them) or on embeddings.
        target_parameters: raw 2-D / 3-D `nn.Parameter`s to adapt (PEFT's name), by full name
            or name suffix, e.g. "experts.gate_up_proj" (a mixture-of-experts stack, one LoRA
            per expert); see `lorakit.layers.parameter`. With it, `targets` may be empty;
            dropout and DoRA are refused (PEFT's rule).
        trainable_token_indices: token ids whose input-embedding rows train in full, the rest
            of the table frozen (PEFT's name; see `lorakit.layers.trainable_tokens`): a list
            (the model's input embedding) or {embedding module name or suffix: list}.

    Raises:
        ConfigError: an option has an invalid value; the message names it.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = ALL_LINEAR
    exclude: str | tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    bias: Bias = "none"
    modules_to_save: tuple[str, ...] = ()
    init: Init = "kaiming"
    dtype: torch.dtype | None = torch.float32
    use_dora: bool = False
    lora_bias: bool = False
    target_parameters: tuple[str, ...] = ()
    trainable_token_indices: TokenIndices = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        check_rank(self.rank)
        set_(self, "alpha", check_alpha(self.alpha))
        set_(self, "dropout", check_dropout(self.dropout))
        if isinstance(self.targets, str):
            _compile(self.targets, "targets")
        else:
            set_(self, "targets", _as_tuple(self.targets, "targets"))
            set_(self, "target_parameters", _as_parameters(self.target_parameters))
            if not self.targets and not self.target_parameters:
                raise ConfigError("targets must name at least one module, got []")
        if isinstance(self.exclude, str) and self.exclude:
            _compile(self.exclude, "exclude")
        elif not isinstance(self.exclude, str):
            set_(self, "exclude", _as_tuple(self.exclude, "exclude"))
        set_(self, "modules_to_save", _as_tuple(self.modules_to_save, "modules_to_save"))
        ranks = _as_patterns(self.rank_pattern, "rank_pattern")
        alphas = _as_patterns(self.alpha_pattern, "alpha_pattern")
        for key, r in ranks.items():
            check_rank(r, f"rank_pattern[{key!r}]")
        for key, a in alphas.items():
            alphas[key] = check_alpha(a, f"alpha_pattern[{key!r}]")
        set_(self, "rank_pattern", FrozenDict(ranks))
        set_(self, "alpha_pattern", FrozenDict(alphas))
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be a bool, got {self.use_dora!r}")
        _check_lora_bias(self)
        check_choice(self.bias, "bias", get_args(Bias))
        check_init(self.init)
        set_(self, "dtype", _as_dtype(self.dtype))
        set_(self, "target_parameters", _as_parameters(self.target_parameters))
        _check_parameter_options(self)
        tokens = check_token_indices(self.trainable_token_indices)
        tokens = FrozenDict(tokens) if isinstance(tokens, dict) else tokens
        set_(self, "trainable_token_indices", tokens)

    def for_module(self, module_name: str) -> LoraConfig:
        """This config with `rank_pattern` / `alpha_pattern` applied for `module_name`."""
        rank_key = pattern_key(self.rank_pattern, module_name)
        alpha_key = pattern_key(self.alpha_pattern, module_name)
        if rank_key is None and alpha_key is None:
            return self
        return dataclasses.replace(
            self,
            rank=self.rank if rank_key is None else self.rank_pattern[rank_key],
            alpha=self.alpha if alpha_key is None else self.alpha_pattern[alpha_key],
        )

    @property
    def scaling(self) -> float:
        """alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return scaling(self.rank, self.alpha, self.use_rslora)


def _check_lora_bias(config: LoraConfig) -> None:
    """PEFT's rules for lora_bias: a bool, and neither with DoRA nor with another init than
    the default (kaiming; "zeros" is lorakit's for loading)."""
    if not isinstance(config.lora_bias, bool):
        raise ConfigError(f"lora_bias must be a bool, got {config.lora_bias!r}")
    if config.lora_bias and config.use_dora:
        raise ConfigError("lora_bias=True is not supported with use_dora=True (nor in PEFT)")
    if config.lora_bias and config.init not in ("kaiming", "zeros"):
        raise ConfigError(
            f"lora_bias=True is not supported with init={config.init!r} (PEFT allows it only "
            "with its default init); use init='kaiming'"
        )


def _as_parameters(value: object) -> tuple[str, ...]:
    """`target_parameters` as a tuple of names; a bare str is refused, as PEFT does."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(
            f"target_parameters must be a list of parameter names, got {value!r}"
        )
    if not all(isinstance(v, str) and v and not v.startswith(".") for v in value):
        raise ConfigError(
            f"target_parameters must hold parameter names like 'experts.gate_up_proj', "
            f"got {list(value)!r}"
        )
    return tuple(dict.fromkeys(value))


def _check_parameter_options(config: LoraConfig) -> None:
    """PEFT's refusals for adapted parameters: dropout cannot be applied to an input the
    adapter never sees (the weight is replaced, not the output added to), and no DoRA."""
    if not config.target_parameters:
        return
    if config.dropout:
        raise ConfigError(
            f"target_parameters does not work with dropout={config.dropout} (the adapted "
            "parameter's input is never seen by the adapter); use dropout=0"
        )
    if config.use_dora:
        raise ConfigError("target_parameters does not work with use_dora=True")


def _compile(pattern: str, option: str, shown: str | None = None) -> re.Pattern[str]:
    """Compile `pattern`, or raise ConfigError naming `option` and `shown` (the user's text)."""
    try:
        return re.compile(pattern)
    except re.error as err:
        text = pattern if shown is None else shown
        raise ConfigError(f"{option} is not a valid regex: {text!r} ({err})") from None
