"""The hand-written rotary embedding gives transformers' numbers to the bit, forward and
backward, and is used only where it computes the same function."""

import pytest
import torch
from transformers.models.llama import modeling_llama

from tunelab.training.rotary import fast_rotary


def _angles(dtype, equal_halves=True):
    torch.manual_seed(0)
    freqs = torch.randn(2, 11, 4) * 3
    second = freqs if equal_halves else freqs + 1
    emb = torch.cat([freqs, second], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_and_backward(function, dtype, cos, sin):
    torch.manual_seed(1)
    # (B, L, H, D) memory seen as (B, H, L, D), as the projections' outputs are
    q = torch.randn(2, 11, 6, 8, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 11, 2, 8, dtype=dtype).transpose(1, 2).requires_grad_()
    q_out, k_out = function(q, k, cos, sin)
    torch.autograd.backward((q_out, k_out), (torch.randn_like(q_out), torch.randn_like(k_out)))
    return q_out, k_out, q.grad, k.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_transformers_to_the_bit(tiny_model_dir, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    original = modeling_llama.apply_rotary_pos_emb
    cos, sin = _angles(dtype)
    want = _rotate_and_backward(original, dtype, cos, sin)
    with fast_rotary(model) as switched:
        assert switched == 1 and modeling_llama.apply_rotary_pos_emb is not original
        got = _rotate_and_backward(modeling_llama.apply_rotary_pos_emb, dtype, cos, sin)
    assert modeling_llama.apply_rotary_pos_emb is original
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert got[0].stride() == want[0].stride()  # the attention reads (B, L, H, D) as a view


def test_other_angles_and_mixed_dtypes_keep_transformers_function(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tunelab.training import rotary

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    calls = []
    monkeypatch.setattr(rotary._Rotary, "apply", lambda *a: calls.append(a) or a[0])
    unequal = _angles(torch.float32, equal_halves=False)
    fp32_angles = _angles(torch.float32)
    with fast_rotary(model):
        fast = modeling_llama.apply_rotary_pos_emb
        _rotate_and_backward(fast, torch.float32, *unequal)  # halves differ: not Llama's
        q = torch.randn(2, 6, 11, 8, dtype=torch.bfloat16)
        fast(q, q[:, :2], *fp32_angles)  # bf16 queries, fp32 angles: promotion stays
    assert calls == []
