"""The hand-written RMSNorm gives transformers' numbers, forward and backward, and is used only
where it computes the same function."""

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tunelab.training.norm import fast_rms_norm, rms_norm


def _norm(width: int, dtype: torch.dtype) -> LlamaRMSNorm:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(width, eps=1e-5)
    norm.weight.data = 1 + 0.3 * torch.randn(width)
    return norm.to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers_forward_and_backward(dtype):
    norm = _norm(96, dtype)
    x = (torch.randn(3, 17, 96) * 3).to(dtype)
    grad = torch.randn(3, 17, 96).to(dtype)
    exact_x = x.double().requires_grad_(True)
    weight = norm.weight.double()
    exact = weight * exact_x * torch.rsqrt(exact_x.pow(2).mean(-1, keepdim=True) + 1e-5)
    exact.backward(grad.double())
    results = {}
    for name, function in (("hf", norm), ("tunelab", lambda t: rms_norm(t, norm.weight, 1e-5))):
        leaf = x.clone().requires_grad_(True)
        out = function(leaf)
        out.backward(grad)
        results[name] = (out, leaf.grad)
    (hf_out, hf_grad), (out, grad_x) = results["hf"], results["tunelab"]
    assert out.dtype == grad_x.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, hf_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_x, hf_grad, rtol=1e-5, atol=1e-6)
    else:
        # bf16: no further from the exact values than transformers' own module
        for mine, theirs, want in ((out, hf_out, exact), (grad_x, hf_grad, exact_x.grad)):
            mine_error = (mine.double() - want).abs().mean()
            their_error = (theirs.double() - want).abs().mean()
            assert mine_error <= their_error * 1.05
            torch.testing.assert_close(mine.float(), theirs.float(), rtol=2e-2, atol=2e-2)


class _GemmaStyleNorm(LlamaRMSNorm):
    def forward(self, hidden_states):  # (1 + weight): another function, must not be switched
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        normed = hidden_states.float() * torch.rsqrt(variance + self.variance_epsilon)
        return (normed * (1.0 + self.weight.float())).to(hidden_states.dtype)


def test_only_frozen_llama_style_norms_are_switched_and_restored():
    frozen, trained, other = _norm(8, torch.float32), _norm(8, torch.float32), _GemmaStyleNorm(8)
    trained.weight.requires_grad_(True)
    model = nn.ModuleList([frozen, trained, other])
    x = torch.randn(2, 8, requires_grad=True)
    before = [m(x) for m in model]
    with fast_rms_norm(model) as switched:
        assert switched == 2  # the Gemma-style norm keeps its own forward
        assert "forward" not in other.__dict__
        during = [m(x) for m in model]
        # the trained norm falls back to its own forward, so its weight still gets a gradient
        during[1].sum().backward()
        assert trained.weight.grad is not None and trained.weight.grad.abs().sum() > 0
        assert during[0].grad_fn.name() == "_RMSNormBackward"
        assert during[1].grad_fn.name() != "_RMSNormBackward"
    assert all("forward" not in m.__dict__ for m in model)
    for b, d in zip(before, during, strict=True):
        torch.testing.assert_close(d, b, rtol=1e-5, atol=1e-6)


def test_a_trained_model_uses_it_for_every_norm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    ids = torch.randint(5, 300, (2, 12))
    reference = model(input_ids=ids).logits
    with fast_rms_norm(model) as switched:
        assert switched == sum(isinstance(m, LlamaRMSNorm) for m in model.modules()) > 0
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=1e-4, atol=1e-5)
