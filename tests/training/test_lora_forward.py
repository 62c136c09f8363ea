"""The lean LoRA forward computes PEFT's function, dropout included, and steps aside wherever
PEFT does something else."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tunelab.training.lora_forward import lean_lora_forward, lora_linear_forward


def _lora_model(tiny_model_dir, dropout=0.0, **extra):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"], **extra
    )
    model = get_peft_model(model, config)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters something to add
            parameter.data.normal_(0, 0.2)
    return model


def _loss_and_grads(model, ids, precision):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lean_forward_matches_peft_loss_and_gradients(tiny_model_dir, precision):
    model = _lora_model(tiny_model_dir)
    model.train()
    ids = torch.randint(5, 300, (2, 16))
    want_loss, want = _loss_and_grads(model, ids, precision)
    with lean_lora_forward(model) as switched:
        assert switched == 4  # q_proj and v_proj of two layers
        loss, got = _loss_and_grads(model, ids, precision)
    tolerance = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(loss, want_loss, **tolerance)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tolerance)


def test_dropout_is_unbiased_and_drops_the_configured_share(tiny_model_dir):
    """Dropout's 1/(1-p) scale is folded into the adapter's multiplication: averaged over many
    draws the adapter adds what it adds without dropout, and a single draw zeroes about p of
    the adapter's input."""
    model = _lora_model(tiny_model_dir, dropout=0.5)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.train()
    x = torch.randn(1, 8, 64)
    with torch.no_grad():
        base = layer.base_layer(x)
        layer.lora_dropout["default"].eval()
        no_dropout = lora_linear_forward(layer, x) - base
        layer.lora_dropout["default"].train()
        torch.manual_seed(0)
        draws = torch.stack([lora_linear_forward(layer, x) - base for _ in range(4000)])
    # unbiased: every element's mean is within 5 standard errors of the no-dropout output
    standard_error = draws.std(0) / len(draws) ** 0.5
    assert ((draws.mean(0) - no_dropout).abs() < 5 * standard_error).all()
    # one draw, with A = identity on the first 4 inputs: a dropped input gives a zero column
    with torch.no_grad():
        layer.lora_A["default"].weight.zero_()
        layer.lora_A["default"].weight[:, :4] = torch.eye(4)
        layer.lora_B["default"].weight.zero_()
        layer.lora_B["default"].weight[:4] = torch.eye(4)
        ones = torch.ones(1, 20_000, 64)
        adapter = lora_linear_forward(layer, ones) - layer.base_layer(ones)
    kept = adapter[0, :, :4] != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    scale = layer.scaling["default"] / 0.5
    torch.testing.assert_close(
        adapter[0, :, :4][kept], torch.full_like(adapter[0, :, :4][kept], scale)
    )
    # reproducible from the global seed
    torch.manual_seed(3)
    first = lora_linear_forward(layer, ones)
    torch.manual_seed(3)
    torch.testing.assert_close(lora_linear_forward(layer, ones), first)


def test_peft_forward_is_kept_where_it_does_something_else(tiny_model_dir):
    dora = _lora_model(tiny_model_dir, use_dora=True)
    with lean_lora_forward(dora) as switched:
        assert switched == 0
    model = _lora_model(tiny_model_dir)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 5, 64)
    with torch.no_grad(), lean_lora_forward(model):
        with model.disable_adapter():
            torch.testing.assert_close(layer(x), layer.base_layer(x))
        layer.merge()
        merged = layer(x)  # the merged weight alone, no adapter added twice
        layer.unmerge()
        torch.testing.assert_close(merged, layer(x), rtol=1e-5, atol=1e-5)
    assert "forward" not in layer.__dict__  # PEFT's own forward is back
