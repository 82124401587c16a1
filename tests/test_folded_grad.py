"""`lorakit.folded_grad`: grad x = g W' and u_a = s_a g B_a from one GEMM."""

import pytest
import torch

from lorakit.folded_grad import folded_grads
from lorakit.fused import _merged


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("ranks", [(4,), (2, 8), (3, 1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("u_scale", [1.0, 3.0])
def test_folded_grads_equal_the_separate_products(transposed, ranks, dtype, u_scale):
    torch.manual_seed(0)
    n_out, n_in, n = 12, 7, 9
    weight = torch.randn(n_in, n_out) if transposed else torch.randn(n_out, n_in)
    weight = weight.to(dtype)
    factors = []
    for r in ranks:
        factors += [torch.randn(r, n_in, dtype=dtype), torch.randn(n_out, r, dtype=dtype)]
    scales = tuple(0.5 + i for i in range(len(ranks)))
    g = torch.randn(n, n_out, dtype=dtype)
    grad_x, us = folded_grads(g, weight, factors, scales, transposed, u_scale)
    w_prime = _merged(weight, tuple(factors), scales, transposed)
    expected_x = g @ (w_prime.t() if transposed else w_prime)
    torch.testing.assert_close(grad_x, expected_x)
    assert len(us) == len(ranks)
    for i, u in enumerate(us):
        torch.testing.assert_close(u, u_scale * (g @ factors[2 * i + 1]))
    assert grad_x.shape == (n, n_in) and [u.shape for u in us] == [(n, r) for r in ranks]


def test_weight_is_left_untouched():
    torch.manual_seed(1)
    weight = torch.randn(6, 5)
    before = weight.clone()
    folded_grads(torch.randn(4, 6), weight, [torch.randn(2, 5), torch.randn(6, 2)], (2.0,), False)
    assert torch.equal(weight, before)
