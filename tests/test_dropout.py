"""The adapter dropout used in training: same statistics as nn.Dropout, swapped in and out."""

import pytest
import torch
from torch import nn

from tunelab.training.dropout import FastDropout, fast_adapter_dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_fast_dropout_drops_p_and_keeps_the_mean(p, dtype):
    torch.manual_seed(0)
    x = torch.ones(1_000_000, dtype=dtype)
    y = FastDropout(p).train()(x)
    dropped = float((y == 0).float().mean())
    assert dropped == pytest.approx(p, abs=0.002)  # 1e6 draws: 4 standard errors at p = 0.5
    # inverted dropout: the expectation is unchanged (bf16: only per-element rounding)
    assert float(y.float().mean()) == pytest.approx(1.0, abs=0.005)
    kept = y[y != 0].float()
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=4e-3)


def test_fast_dropout_is_identity_in_eval_and_reproducible_by_seed():
    x = torch.randn(64, 32)
    layer = FastDropout(0.3)
    assert layer.eval()(x) is x
    layer.train()
    torch.manual_seed(7)
    a = layer(x)
    torch.manual_seed(7)
    assert torch.equal(layer(x), a)
    # gradients flow only through kept elements, scaled like the forward
    x.requires_grad_(True)
    torch.manual_seed(7)
    layer(x).sum().backward()
    assert torch.equal(x.grad, (a != 0).float() / 0.7)


def test_adapter_dropouts_are_swapped_for_the_run_and_restored(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    )
    originals = [m for m in model.modules() if type(m) is nn.Dropout and m.p == 0.1]
    with fast_adapter_dropout(model) as swapped:
        assert swapped == len(originals) > 0
        assert sum(isinstance(m, FastDropout) for m in model.modules()) == swapped
    assert not any(isinstance(m, FastDropout) for m in model.modules())
    assert [m for m in model.modules() if type(m) is nn.Dropout and m.p == 0.1] == originals


def test_threaded_draws_depend_only_on_the_global_seed():
    from tunelab.training.dropout import PARALLEL_MIN_ELEMENTS, random_int16

    shape = torch.Size([4, PARALLEL_MIN_ELEMENTS])
    torch.manual_seed(3)
    a = random_int16(shape, torch.device("cpu"))
    torch.manual_seed(3)
    b = random_int16(shape, torch.device("cpu"))
    assert torch.equal(a, b)
    halves = a.view(-1).chunk(2)
    assert not torch.equal(halves[0], halves[1])  # each part has its own stream
    counts = torch.bincount((a.view(-1).long() + 32768) >> 12, minlength=16)
    assert counts.min() > 0.9 * a.numel() / 16  # uniform over the 16-bit range
