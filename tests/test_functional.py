"""The pure LoRA math: the low-rank product, the delta weight and the merged weight."""

from __future__ import annotations

import torch

from lorakit import dropout_masks, functional, fused
from lorakit.functional import delta_weight, linear_delta, merged_weight


def test_linear_delta_is_the_delta_weight_applied_to_x():
    torch.manual_seed(0)
    x, A, B = torch.randn(5, 3, 6, dtype=torch.float64), torch.randn(4, 6), torch.randn(7, 4)
    A, B = A.double(), B.double()
    want = x @ (2.5 * B @ A).t()
    torch.testing.assert_close(linear_delta(x, A, B, 2.5), want)
    torch.testing.assert_close(delta_weight(A, B, 2.5), 2.5 * B @ A)


def test_delta_weight_of_a_conv_has_the_kernel_shape():
    """A (r, in, k, k) and B (out, r, 1, 1) give s B A as (out, in, k, k)."""
    A, B = torch.randn(4, 3, 5, 5), torch.randn(8, 4, 1, 1)
    delta = delta_weight(A, B, 0.5)
    assert delta.shape == (8, 3, 5, 5)
    want = torch.einsum("or,rikl->oikl", B.flatten(1), A) * 0.5
    torch.testing.assert_close(delta, want)


def test_merged_weight_adds_in_the_wider_dtype_and_keeps_the_weights():
    weight = torch.full((2, 2), 1.0, dtype=torch.bfloat16)
    delta = torch.full((2, 2), 1e-3, dtype=torch.float64)
    merged = merged_weight(weight, delta)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (weight.double() + delta).to(torch.bfloat16))
    assert torch.equal(merged_weight(merged, delta, sign=-1), (merged.double() - delta).bfloat16())


def test_fused_names_are_still_importable_from_functional():
    """The fused op and its masks moved out; their old import path keeps working."""
    assert functional.fused_lora_linear is fused.fused_lora_linear
    assert functional.merge_pays is fused.merge_pays
    assert functional.autocast_dtype is fused.autocast_dtype
    assert functional.dropout_keep is dropout_masks.dropout_keep
    assert functional.dropout_mask is dropout_masks.dropout_mask
