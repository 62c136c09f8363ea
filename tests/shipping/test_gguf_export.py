"""GGUF export: transformers' own GGUF loader reads the file back with matching logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.api import FineTuner
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.shipping.gguf_export import export_gguf

TEXT = "What does a compiler do? <|im_end|> A byte is 8 bits, héllo."
# max |logit difference| allowed per type on the tiny model (logits of magnitude ~1): f32 is
# exact up to float noise; f16/bf16 round weights to 11/8 mantissa bits; q8_0 to 8-bit blocks
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2}


def round_trip(source, out_file, out_type):
    export_gguf(source, out_file, out_type)
    folder, name = str(out_file.parent), out_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    original_tokenizer = AutoTokenizer.from_pretrained(source)
    ids = original_tokenizer(TEXT, return_tensors="pt", add_special_tokens=False).input_ids
    assert torch.equal(
        tokenizer(TEXT, return_tensors="pt", add_special_tokens=False).input_ids, ids
    )
    assert tokenizer.chat_template == original_tokenizer.chat_template
    with torch.no_grad():
        return original(ids).logits, loaded(ids).logits


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
def test_round_trip_through_transformers_gguf_loader(out_type, tiny_model_dir, tmp_path):
    expected, got = round_trip(tiny_model_dir, tmp_path / f"tiny-{out_type}.gguf", out_type)
    assert (expected - got).abs().max() <= TOLERANCE[out_type]
    assert torch.equal(expected.argmax(-1), got.argmax(-1))


def test_export_command_merges_a_run_first(make_config, tmp_path, capsys):
    config = make_config(max_steps=3, learning_rate=1e-2, target_modules=["all-linear"])
    FineTuner(config).train()
    out = tmp_path / "run.gguf"
    assert (
        main(["export", config.output_dir, "--format", "gguf", "--type", "f32", "--out", str(out)])
        == 0
    )
    assert "Wrote" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert main(["merge", config.output_dir, str(merged)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=out.name, dtype=torch.float32
    )
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = torch.tensor([[5, 40, 90, 200]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_export_errors(tiny_model_dir, tmp_path):
    with pytest.raises(TunelabError, match="GGUF type 'q4' is not supported"):
        export_gguf(tiny_model_dir, tmp_path / "x.gguf", "q4")
    with pytest.raises(TunelabError, match="not a transformers model folder"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1})
    )
    with pytest.raises(
        TunelabError, match="is a GPT2LMHeadModel; tunelab exports LlamaForCausalLM"
    ):
        export_gguf(other, tmp_path / "x.gguf")


@pytest.mark.slow
def test_default_model_exports_to_q8_0(tmp_path):
    from tunelab.models import resolve_model

    expected, got = round_trip(resolve_model(None), tmp_path / "smollm2-q8_0.gguf", "q8_0")
    # measured: max |diff| about 1.2 on logits of magnitude ~20; 17 of 19 positions keep the
    # same top token (the other two are near-ties), and every original top token stays in the
    # quantised model's top 3
    assert (expected - got).abs().max() < 2.0
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() >= 0.85
    top3 = got.topk(3, dim=-1).indices
    assert (top3 == expected.argmax(-1, keepdim=True)).any(-1).all()
