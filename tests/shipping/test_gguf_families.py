"""GGUF export of the families llama.cpp runs that users train (Qwen2, Qwen3, Gemma 2, Gemma 3,
Phi-3 here; Llama and Mistral in test_gguf_export): read back by transformers' GGUF loader with
the same logits, and the end-of-turn and padding tokens written where llama.cpp reads them."""

import shutil

import gguf
import pytest
import torch
from conftest import TINY_SIZES
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.shipping.gguf_export import end_of_turn_id, export_gguf

TEXT = "What does a compiler do? <|im_end|> héllo 1234"


def family_config(family, tokenizer):
    """A tiny config of ``family``; head sizes are the ones transformers' GGUF loader assumes
    for the family where it does not read them from the file (Qwen3 128, Gemma 256)."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=len(tokenizer),
        **TINY_SIZES,
        num_hidden_layers=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    gemma = dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=1024)
    return {
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3": lambda: Qwen3Config(**common, head_dim=128, tie_word_embeddings=True),
        "gemma2": lambda: Gemma2Config(**common, **gemma),
        "gemma3": lambda: Gemma3TextConfig(**common, **gemma),
        "phi3": lambda: Phi3Config(**common, pad_token_id=tokenizer.eos_token_id),
    }[family]()


def build_family_model(family, tiny_model_dir, folder):
    """A randomly initialised ``family`` model (weights and norms far from their defaults, so
    a missed norm offset or permutation shows) with the tiny BPE tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, tokenizer))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.3)
            else:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


FAMILIES = ["qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
ARCH = {"gemma3": "gemma3", "phi3": "phi3"}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_reads_back_with_the_same_logits(family, tiny_model_dir, tmp_path):
    source = build_family_model(family, tiny_model_dir, tmp_path / family)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    for out_type, tolerance in (("f32", 1e-4), ("f16", 1e-2)):
        export_gguf(source, tmp_path / f"{family}-{out_type}.gguf", out_type)
        loaded = AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=f"{family}-{out_type}.gguf", dtype=torch.float32
        )
        with torch.no_grad():
            expected, got = original(ids).logits, loaded(ids).logits
        # relative to the largest logit; f16 keeps 11 mantissa bits (q8_0, the same code for
        # every family, is checked in test_gguf_export)
        error = (expected - got).abs().max() / expected.abs().max()
        assert error <= tolerance, (family, out_type, float(error))
        assert torch.equal(expected.argmax(-1), got.argmax(-1)), (family, out_type)
    reader = gguf.GGUFReader(tmp_path / f"{family}-f32.gguf")
    arch = reader.fields["general.architecture"].contents()
    assert arch == ARCH.get(family, family)


def test_end_of_turn_and_padding_tokens_are_written(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # the tiny tokenizer's EOS is <|im_end|>, which ends ChatML turns: no separate EOT needed
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    folder = tmp_path / "eos-differs"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer.eos_token = "<|endoftext|>"  # as in Qwen2 and SmolLM2 base models
    tokenizer.save_pretrained(folder)
    reader = gguf.GGUFReader(export_gguf(folder, tmp_path / "m.gguf", "f16"))

    def field(key):
        return reader.fields[key].contents()

    im_end, endoftext = (
        tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
    )
    assert field("tokenizer.ggml.eos_token_id") == endoftext
    assert field("tokenizer.ggml.eot_token_id") == im_end
    # no pad token in the tokenizer: tunelab pads with EOS, and says so in the file
    assert field("tokenizer.ggml.padding_token_id") == endoftext
