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


def test_cpu_masks_depend_only_on_the_global_seed_and_are_uniform():
    from tunelab.training.dropout import keep_mask

    shape, cpu = torch.Size([3, 1001]), torch.device("cpu")  # not a multiple of 4 draws
    torch.manual_seed(3)
    a = keep_mask(shape, 0.25, torch.bfloat16, cpu)
    torch.manual_seed(3)
    assert torch.equal(keep_mask(shape, 0.25, torch.bfloat16, cpu), a)
    assert a.shape == shape and a.dtype == torch.bfloat16
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(keep_mask(shape, 0.25, torch.bfloat16, cpu), a)  # the RNG moved on
    # every 16-bit draw position (four per 64-bit word) drops at the same rate
    torch.manual_seed(0)
    big = keep_mask(torch.Size([4 * 250_000]), 0.25, torch.float32, cpu).view(-1, 4)
    assert torch.allclose(1 - big.mean(0), torch.full((4,), 0.25), atol=0.005)
    # the threshold is exact to 1/65,536: p = 1/65,536 drops about 15 of 1,000,000
    torch.manual_seed(1)
    rare = keep_mask(torch.Size([1_000_000]), 1 / 65536, torch.float32, cpu)
    assert 3 <= int((rare == 0).sum()) <= 35
