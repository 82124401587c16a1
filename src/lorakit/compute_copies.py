"""Compute-dtype copies of adapter factors: cast once, reused until the factor changes.

With float32 adapters on a bf16 model, or under bf16 autocast, the fused op multiplies in
bf16, so every call would cast A and B again: two small kernels per adapter and layer, which
on a GPU running a small model cost about as much as the products themselves.
`compute_copy` keeps one cast copy per factor and hands it out while the factor is unchanged:

- An entry is keyed by the factor object (weakly: it dies with the factor) and checked on
  every call against the factor's version counter (in-place writes through PyTorch bump it:
  `copy_`, `mul_`, `load_state_dict`, foreach optimizer steps), its data pointer (a `.data =`
  swap, `module.to(device)`), shape, dtype and device. A changed factor gets a new copy; an
  old copy is never written, since a pending backward may hold it.
- Every optimizer step drops all copies (a global post-step hook of `torch.optim`, set with
  the first copy): fused optimizers write the parameters without bumping their version
  counters (torch's `fused=True` AdamW and bitsandbytes' optimizers do), as may others.
  So a train step casts once per step.
- The copy is made under no_grad from the detached factor: it holds no graph, and gradients
  still go to the factor, which the fused op takes as its input (autograd casts the
  gradient back to the factor's dtype).

The cache is skipped (the caller casts per call, as before) wherever that check cannot be
trusted: under torch.compile or tracing (dynamo cannot trace version counters; a compiled
graph fuses the casts anyway), for anything but a plain leaf tensor or Parameter (graph
results, views, subclasses such as DTensor, functorch wrappers, inference tensors, meta),
and while torch.distributed is initialized (FSDP2 refills its parameters without bumping
their version counters). Writes through `.data` bypass the version counter, as they bypass
autograd: call `clear()` after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["clear", "compute_copy", "copy_of", "factors_in_dtype"]

_PLAIN_TYPES = (Tensor, nn.Parameter)


class _Copy(NamedTuple):
    """A cast copy and the state of its factor when it was made."""

    stamp: tuple
    tensor: Tensor


# factor -> _Copy; keyed by identity (tensors compare elementwise), weakly
_copies = WeakIdKeyDictionary()


def _stamp(factor: Tensor, dtype: torch.dtype) -> tuple:
    """What must be unchanged for a copy of `factor` in `dtype` to hold its values."""
    return (factor._version, factor.data_ptr(), factor.shape, factor.dtype, factor.device, dtype)


def _functorch_wrapped(t: Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return check is not None and check(t)


def _cacheable(factor: Tensor) -> bool:
    """Whether a copy of `factor` can be checked against it (see the module docstring)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if type(factor) not in _PLAIN_TYPES or not factor.is_leaf or factor._is_view():
        return False
    if factor.is_inference() or factor.device.type == "meta" or _functorch_wrapped(factor):
        return False
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def compute_copy(factor: Tensor, dtype: torch.dtype) -> Tensor | None:
    """`factor` cast to `dtype`, the same copy while `factor` is unchanged; None where the
    cache cannot be trusted (then cast per call)."""
    if not _cacheable(factor):
        return None
    stamp = _stamp(factor, dtype)
    entry = _copies.get(factor)
    if entry is not None and entry.stamp == stamp:
        return entry.tensor
    with torch.no_grad(), torch.inference_mode(False):  # a normal tensor, even from inference
        copy = factor.detach().to(dtype)
    _watch_optimizer_steps()
    _copies[factor] = _Copy(stamp, copy)
    return copy


def factors_in_dtype(
    lora_A: Sequence[Tensor], lora_B: Sequence[Tensor], dtype: torch.dtype
) -> tuple[list[Tensor], list[Tensor]]:
    """(A_1, B_1, ...) as the node takes them (their gradients go there) and as it multiplies
    them in `dtype`: each factor itself, or its kept copy with the factor as the input
    (`compute_copy`), or else a per-call cast, the node's input and multiplied alike."""
    factors: list[Tensor] = []
    computes: list[Tensor] = []
    for A, B in zip(lora_A, lora_B):
        for f in (A, B):
            c = f if f.dtype is dtype else compute_copy(f, dtype)
            if c is None:
                f = c = f.to(dtype)
            factors.append(f)
            computes.append(c)
    return factors, computes


def _forget_after_step(optimizer: object, args: object, kwargs: object) -> None:
    """Optimizer post-step hook: the step may have written factors untracked (see above)."""
    if not torch.compiler.is_compiling():  # compiled steps write back with copy_: tracked
        _copies.clear()


_step_hook: list = []  # the hook's handle, once set


def _watch_optimizer_steps() -> None:
    if not _step_hook:
        _step_hook.append(register_optimizer_step_post_hook(_forget_after_step))


def copy_of(factor: Tensor) -> Tensor | None:
    """The copy kept for `factor` (whatever its state now), or None."""
    entry = _copies.get(factor)
    return None if entry is None else entry.tensor


def clear() -> None:
    """Drop every kept copy (after writing factors through `.data`, which nothing tracks)."""
    _copies.clear()
