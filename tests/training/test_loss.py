"""The fused linear cross-entropy gives the loss and gradients of the plain computation."""

import pytest
import torch
import torch.nn.functional as F

from tunelab.training.loss import chunked_cross_entropy, linear_cross_entropy


def reference(hidden, head, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_loss_and_gradient_match_autograd(precision, monkeypatch):
    # softmax over 5 rows at a time inside blocks of 16: both kinds of boundary, partial ones too
    monkeypatch.setattr("tunelab.training.loss.SOFTMAX_ROWS", 5)
    torch.manual_seed(0)
    head = torch.nn.Linear(24, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(70, 24, requires_grad=True)
    targets = torch.randint(0, 300, (70,))
    results = []
    for function in (linear_cross_entropy, reference):
        hidden.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = (
                function(hidden, head, targets, 16)  # blocks of 16 rows: 5 blocks, 1 partial
                if function is linear_cross_entropy
                else function(hidden, head, targets)
            )
        (loss * 0.25).backward()  # a scale from outside reaches the fused gradient
        results.append((loss.detach(), hidden.grad.clone()))
    (fused, fused_grad), (plain, plain_grad) = results
    tolerance = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(fused, plain, **tolerance)
    torch.testing.assert_close(fused_grad, plain_grad, **tolerance)


def test_trained_head_and_evaluation_use_the_autograd_path(monkeypatch):
    """A head that trains (new tokens, full fine-tuning) needs its own gradient, and under
    no_grad there is no gradient to compute: both take the chunked path."""
    calls = []
    real = chunked_cross_entropy

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("tunelab.training.loss.chunked_cross_entropy", spy)
    head = torch.nn.Linear(8, 20, bias=False)  # trainable
    hidden = torch.randn(5, 8, requires_grad=True)
    targets = torch.randint(0, 20, (5,))
    linear_cross_entropy(hidden, head, targets).backward()
    assert calls == [1] and head.weight.grad is not None
    head.requires_grad_(False)
    with torch.no_grad():
        linear_cross_entropy(hidden, head, targets)
    assert calls == [1, 1]
    linear_cross_entropy(hidden, head, targets)  # frozen head, training: fused
    assert calls == [1, 1]


def test_fused_loss_of_a_target_whose_probability_underflows():
    """A target 400 below the top logit has probability 0 in fp32: its loss comes from the
    log-sum-exp instead (no inf), alongside ordinary rows in the same slice."""
    head = torch.nn.Linear(4, 10, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[3] = -100.0  # logit -400 for target 3 on an all-ones hidden state
        head.weight[5] = 0.5
    hidden = torch.ones(3, 4, requires_grad=True)
    targets = torch.tensor([3, 5, 0])
    loss = linear_cross_entropy(hidden, head, targets)
    loss.backward()
    fused_grad = hidden.grad.clone()
    hidden.grad = None
    expected = reference(hidden, head, targets)
    expected.backward()
    assert torch.isfinite(loss) and loss.item() > 400
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(fused_grad, hidden.grad)


def test_fused_loss_buffers_are_reused_between_batches_and_released_after_a_run():
    """The logits block and softmax slices survive from one micro-batch to the next (a fresh
    50 MB block each time was page faults); a batch of another size or dtype gets its own,
    the same numbers come out of reused buffers, and a run frees them at its end."""
    from tunelab.config import FineTuningConfig
    from tunelab.training import loss
    from tunelab.training.loop import training_mode

    torch.manual_seed(0)
    head = torch.nn.Linear(24, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(70, 24, requires_grad=True)
    targets = torch.randint(0, 300, (70,))
    first = linear_cross_entropy(hidden, head, targets, 16)
    buffers = [t.data_ptr() for t in loss._scratch_buffers["value"]]
    again = linear_cross_entropy(hidden, head, targets, 16)
    assert [t.data_ptr() for t in loss._scratch_buffers["value"]] == buffers
    assert torch.equal(first, again)
    linear_cross_entropy(hidden, head, targets, 32)  # another block size: new buffers
    assert loss._scratch_buffers["value"][0].shape == (32, 300)
    with training_mode(torch.nn.Linear(2, 2), FineTuningConfig(packing=False)):
        assert loss._scratch_buffers
    assert not loss._scratch_buffers
