"""Packed attention with Gemma 2's attention soft-capping equals transformers' eager Gemma 2
attention on each packed example alone, outputs and gradients."""

from types import SimpleNamespace

import pytest
import torch
from conftest import packed_qkv

CAP = 1.5
SCALING = 0.3  # large enough that the cap bends the logits


def _eager_alone(q, k, v, lengths, window):
    """transformers' Gemma 2 eager attention on each example of each row alone (its causal
    and sliding-window mask built as transformers builds them): (B, L, Hq, D)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False)
    rows = []
    for r, row in enumerate(lengths):
        parts, start = [], 0
        for n in row:
            part = slice(start, start + n)
            query, key = torch.arange(n)[:, None], torch.arange(n)[None, :]
            allowed = (key <= query) & ((key > query - window) if window else True)
            mask = torch.zeros(n, n).masked_fill(~allowed, float("-inf"))
            out, _ = eager_attention_forward(
                module,
                *(t[r : r + 1, :, part] for t in (q, k, v)),
                mask,
                scaling=SCALING,
                softcap=CAP,
            )
            parts.append(out[0])
            start += n
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize("window", [None, 5], ids=["causal", "sliding"])
@pytest.mark.parametrize("matmul_max_length", [512, 16], ids=["short", "long-buckets"])
def test_softcapped_packed_attention_equals_gemma2_eager(monkeypatch, window, matmul_max_length):
    """Buckets longer than MATMUL_MAX_LENGTH, which SDPA would take without a cap, are
    soft-capped by the matmul path too; grouped-query heads."""
    from tunelab.training import attention

    monkeypatch.setattr(attention, "MATMUL_MAX_LENGTH", matmul_max_length)
    lengths, positions, q, k, v, weights = packed_qkv()
    out, _ = attention.packed_attention_forward(
        None, q, k, v, None, scaling=SCALING, position_ids=positions, sliding_window=window,
        softcap=CAP,
    )  # fmt: skip
    (out * weights).sum().backward()
    packed = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected = _eager_alone(q, k, v, lengths, window)
    (expected * weights).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(packed, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the cap matters here: without it the outputs differ
    uncapped, _ = attention.packed_attention_forward(
        None, q, k, v, None, scaling=SCALING, position_ids=positions, sliding_window=window
    )
    assert float((uncapped - out).detach().abs().max()) > 1e-2


def test_softcapped_calls_without_positions_run_gemma2_eager():
    """A call packed attention does not take (no position_ids: one example per row) is
    attended as Gemma 2's eager code does, soft-cap included (SDPA has none)."""
    from tunelab.training import attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    out, _ = attention.packed_attention_forward(
        None, q, k, v, None, scaling=SCALING, sliding_window=5, softcap=CAP
    )
    torch.testing.assert_close(out, _eager_alone(q, k, v, [[12]], 5), rtol=1e-5, atol=1e-6)


def test_attention_softcap_with_attention_dropout_stays_stock():
    from tunelab.training.families import plan_fast_path

    def gemma2(**values):
        config = {"model_type": "gemma2", "attn_logit_softcapping": 50.0, **values}
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert plan_fast_path(gemma2(attention_dropout=0.0)).fast["attention"]
    plan = plan_fast_path(gemma2(attention_dropout=0.1))
    assert not plan.fast["attention"]
    assert plan.why["attention"] == "attention soft-capping with attention_dropout=0.1"
