"""Gemma's RMSNorm (1 + weight, all in fp32) through training.norm's hand-written backward."""

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_rms_norm_forward_and_gradient_equal_transformers(dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from tunelab.training.norm import fast_rms_norm

    torch.manual_seed(0)
    norm = Gemma3RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    norm.requires_grad_(False)
    x = torch.randn(3, 7, 48, dtype=dtype) * 3
    grad = torch.randn(3, 7, 48, dtype=dtype)
    stock_x = x.clone().requires_grad_(True)
    expected = norm(stock_x)
    expected.backward(grad)
    fast_x = x.clone().requires_grad_(True)
    with fast_rms_norm(norm) as switched:
        got = norm(fast_x)
        got.backward(grad)
    assert switched == 1
    assert got.dtype == expected.dtype == dtype
    # fp32: the same arithmetic up to summation order; bf16: one rounding of the same value
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(fast_x.grad, stock_x.grad, **tolerance)
