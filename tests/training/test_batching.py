import pytest
import torch
from conftest import packed_qkv

from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.training.batching import collate, loss_tokens, pack_examples, plan_epoch, single_rows
from tunelab.training.loss import causal_lm_loss_sum


def examples(lengths):
    out, start = [], 10
    for n in lengths:
        ids = list(range(start, start + n))
        out.append(TokenizedExample(ids, list(ids)))
        start += n
    return out


def test_packing_fills_rows_and_restarts_positions():
    rows = pack_examples(examples([5, 3, 4, 2, 6]), max_length=8)
    assert sorted(len(r) for r in rows) == [4, 8, 8]  # first-fit decreasing, no token lost
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        for s in starts:  # every packed example starts at position 0 and is no target
            assert row.labels[s] == IGNORE_INDEX
    assert loss_tokens(rows) == 20 - 5  # each example's first token is no target


def test_collate_pads_after_real_tokens_with_counting_positions():
    rows = single_rows(examples([3, 5]))
    batch = collate(rows, pad_token_id=0)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4]
    assert batch["labels"][0, 3:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]


def test_plan_is_deterministic_per_seed_and_epoch():
    rows = single_rows(examples([3] * 10))
    assert plan_epoch(rows, 4, 1, 0, False) == plan_epoch(rows, 4, 1, 0, False)
    assert plan_epoch(rows, 4, 1, 0, False) != plan_epoch(rows, 4, 1, 1, False)
    flat = sorted(i for b in plan_epoch(rows, 4, 1, 0, True) for i in b)
    assert flat == list(range(10))


def test_packed_loss_equals_separate_losses(tiny_model_dir):
    """No cross-contamination: a packed row's loss is the sum of its examples' losses alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    parts = []
    for n in (7, 11, 5):
        ids = torch.randint(3, 300, (n,)).tolist()
        parts.append(TokenizedExample(ids, list(ids)))
    packed = pack_examples(parts, max_length=64)
    assert len(packed) == 1
    with torch.no_grad():
        together, n_together = causal_lm_loss_sum(model, collate(packed, 0))
        alone = [causal_lm_loss_sum(model, collate(single_rows([p]), 0)) for p in parts]
    assert n_together == sum(n for _, n in alone) == 7 + 11 + 5 - 3
    assert torch.allclose(together, sum(loss for loss, _ in alone), atol=1e-4)


@pytest.mark.parametrize("matmul_max_length", [160, 16, 0], ids=["matmuls", "mixed", "sdpa"])
def test_packed_attention_matches_separate_examples(tiny_model_dir, monkeypatch, matmul_max_length):
    """Packed rows through tunelab's mask-free attention give each example exactly the logits
    it gets alone: no attention crosses an example boundary, positions restart. Short
    examples go through batched matmuls (every bucket at once, or bucket by bucket when the
    batch also holds buckets for SDPA), long ones through SDPA: all three are checked."""
    from transformers import AutoModelForCausalLM

    from tunelab.training import attention
    from tunelab.training.attention import segment_layout, use_packed_attention

    monkeypatch.setattr(attention, "MATMUL_MAX_LENGTH", matmul_max_length)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    lengths = [[7, 20, 3, 10], [25, 15]]  # two rows of 40, including a 3-token example
    torch.manual_seed(0)
    ids = torch.randint(5, 300, (2, 40))
    positions = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    with torch.no_grad():
        alone = []
        for r, row in enumerate(lengths):
            start = 0
            for n in row:
                alone.append(model(input_ids=ids[r : r + 1, start : start + n]).logits[0])
                start += n
        assert use_packed_attention(model)
        packed = model(input_ids=ids, position_ids=positions).logits
    together = []
    for r, row in enumerate(lengths):
        starts = [sum(row[:i]) for i in range(len(row))]
        together += [packed[r, s : s + n] for s, n in zip(starts, row, strict=True)]
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # examples are bucketed by length (powers of two) and padded only within their bucket
    layout = segment_layout(positions)
    assert [tuple(index.shape) for index, _ in layout] == [(1, 3), (1, 7), (2, 15), (2, 25)]
    assert sum(int(real.sum()) for _, real in layout) == 80


def test_buckets_are_powers_of_two_then_multiples_of_the_step():
    from tunelab.training.attention import BUCKET_STEP, bucket_of, segment_layout

    assert BUCKET_STEP == 32
    assert [bucket_of(n) for n in (1, 2, 3, 5, 17, 32, 33, 64, 65, 100, 511)] == [
        1, 2, 4, 8, 32, 32, 64, 64, 96, 128, 512,
    ]  # fmt: skip
    # 70- and 90-token examples share the (64, 96] bucket, padded to 90; 100 gets its own
    lengths = [70, 90, 100, 40]
    positions = torch.tensor([[p for n in lengths for p in range(n)]])
    layout = segment_layout(positions)
    assert [tuple(index.shape) for index, _ in layout] == [(1, 40), (2, 90), (1, 100)]


@pytest.mark.parametrize("matmul_max_length", [160, 16, 0], ids=["matmuls", "mixed", "sdpa"])
def test_packed_attention_gradients_match_separate_examples(monkeypatch, matmul_max_length):
    """Gradients through the bucketed layout (gathers both ways, padding slots dropped) equal
    those of attending to each example alone, grouped-query heads included."""
    import torch.nn.functional as F

    from tunelab.training import attention

    monkeypatch.setattr(attention, "MATMUL_MAX_LENGTH", matmul_max_length)
    lengths, positions, q, k, v, weights = packed_qkv()
    out, _ = attention.packed_attention_forward(None, q, k, v, None, position_ids=positions)
    (out * weights).sum().backward()
    packed = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    loss = 0
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            part = slice(start, start + n)
            alone = F.scaled_dot_product_attention(
                q[r : r + 1, :, part],
                k[r : r + 1, :, part].repeat_interleave(2, dim=1),
                v[r : r + 1, :, part].repeat_interleave(2, dim=1),
                is_causal=True,
            )
            loss = loss + (alone.transpose(1, 2)[0] * weights[r, part]).sum()
            start += n
    loss.backward()
    for got, want in zip(packed, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_all_buckets_at_once_equal_bucket_by_bucket_to_the_bit(monkeypatch):
    """The short examples' outputs and gradients are the same whether every bucket goes
    through one stacked function (all short) or bucket by bucket (a long example sends the
    batch that way): bf16, grouped-query heads."""
    from tunelab.training import attention

    monkeypatch.setattr(attention, "MATMUL_MAX_LENGTH", 32)
    short = [7, 20, 3, 10]
    torch.manual_seed(0)
    q, k, v, weights = (
        torch.randn(1, heads, 80, 16, dtype=torch.bfloat16) for heads in (6, 2, 2, 6)
    )
    results = []
    for lengths in (short, short + [40]):  # 40 > 32: the second batch goes bucket by bucket
        n = sum(lengths)
        positions = torch.tensor([[p for length in lengths for p in range(length)]])
        inputs = [t[:, :, :n].clone().requires_grad_() for t in (q, k, v)]
        out, _ = attention.packed_attention_forward(None, *inputs, None, position_ids=positions)
        (out[0, :40].float() * weights[0, :, :40].transpose(0, 1).float()).sum().backward()
        results.append([out[0, :40]] + [t.grad[:, :, :40] for t in inputs])
    for together, apart in zip(*results, strict=True):
        assert torch.equal(together, apart)


def test_layouts_are_never_reused_for_another_batch():
    """A layout is computed once per forward (every layer gets the same position_ids): a new
    batch's position_ids, even at a freed batch's address, gets its own."""
    from tunelab.training import attention

    for seed in range(200):
        torch.manual_seed(seed)
        cut = int(torch.randint(1, 63, ()))
        positions = torch.cat([torch.arange(cut), torch.arange(64 - cut)])[None].repeat(2, 1)
        cached = attention._cached_stacked_layout(positions, 4, 2)
        assert torch.equal(cached.query_take, attention.stacked_layout(positions, 4, 2).query_take)
        cached = attention._cached_layout(positions)
        assert torch.equal(cached.take, attention.packed_layout(positions).take)
        del positions, cached


def test_group_by_length_decides_how_the_loop_batches_unpacked_rows():
    from types import SimpleNamespace

    from tunelab.config import FineTuningConfig
    from tunelab.training.loop import step_batches

    rows = single_rows(examples([3, 40, 4, 41, 5, 42, 6, 43] * 4))

    def first_epoch(**settings):
        config = FineTuningConfig(packing=False, batch_size=4, **settings)
        run = SimpleNamespace(config=config, per_epoch=8, epoch_plan={},
                              world=SimpleNamespace(size=1))  # fmt: skip
        return [[len(r) for r in b] for s in range(8) for b in step_batches(run, rows, s)]

    grouped, drawn = first_epoch(), first_epoch(group_by_length=False)
    assert all(max(b) - min(b) <= 3 for b in grouped)  # short with short, long with long
    assert any(max(b) - min(b) > 30 for b in drawn)  # drawn at random, as TRL draws them
    assert sorted(map(sorted, drawn)) != sorted(map(sorted, grouped))


def test_preference_pairs_are_drawn_at_random_unless_grouping_is_asked_for():
    from tunelab.config import FineTuningConfig, groups_by_length

    assert groups_by_length(FineTuningConfig(packing=False)) is True
    assert groups_by_length(FineTuningConfig(packing=False, objective="dpo")) is False
    assert groups_by_length(FineTuningConfig(packing=False, objective="kto")) is False
    assert groups_by_length(FineTuningConfig(packing=False, objective="dpo", group_by_length=True))
    assert not groups_by_length(FineTuningConfig(packing=False, group_by_length=False))
    assert not groups_by_length(FineTuningConfig(group_by_length=True))  # packed: no rows to group
