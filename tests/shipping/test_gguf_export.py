"""GGUF export: transformers' own GGUF loader reads the file back with matching logits, the same
tokenization and the same chat template; unsupported inputs fail with messages that say what to do.
"""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from conftest import TINY_SIZES
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig

from tunelab.api import FineTuner
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.shipping.gguf_export import export_gguf, gguf_name, permute_rotary

SAMPLES = [
    "What does a compiler do? <|im_end|> A byte is 8 bits, héllo.",
    "  two spaces, 1234 digits\nand a new line\t<|im_start|>user",
]
# Max |logit difference| allowed per type on the tiny model, whose logits are of magnitude ~1.3.
# Measured: f32 0.0, f16 2.6e-4, bf16 2.0e-3, q8_0 7.3e-3; each bound is ~4-8x that. f32 only
# reorders float sums; f16/bf16 keep 11/8 mantissa bits; q8_0 keeps 8 bits per block of 32.
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2}


def round_trip(source, out_file, out_type):
    """Export, reload through transformers' GGUF loader, check the tokenizer; return logits
    (original, reloaded) on the first sample."""
    export_gguf(source, out_file, out_type)
    folder, name = str(out_file.parent), out_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    original_tokenizer = AutoTokenizer.from_pretrained(source)
    for text in SAMPLES:
        assert tokenizer(text).input_ids == original_tokenizer(text).input_ids, text
    assert tokenizer.chat_template == original_tokenizer.chat_template
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        original_tokenizer.apply_chat_template(chat, tokenize=False)
    )
    ids = original_tokenizer(SAMPLES[0], return_tensors="pt").input_ids
    with torch.no_grad():
        return original(ids).logits, loaded(ids).logits


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
def test_round_trip_through_transformers_gguf_loader(out_type, tiny_model_dir, tmp_path):
    expected, got = round_trip(tiny_model_dir, tmp_path / f"tiny-{out_type}.gguf", out_type)
    assert (expected - got).abs().max() <= TOLERANCE[out_type]
    assert torch.equal(expected.argmax(-1), got.argmax(-1))


def test_file_layout_matches_llama_cpp(tiny_model_dir, tmp_path):
    reader = gguf.GGUFReader(export_gguf(tiny_model_dir, tmp_path / "t.gguf", "q8_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    # tied embeddings: no output.weight, llama.cpp and transformers reuse token_embd
    assert "output.weight" not in types and len(types) == 1 + 1 + 2 * 9
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0

    def field(key):
        value = reader.fields[key]
        return value.contents()

    assert field("general.architecture") == "llama"
    assert field("llama.embedding_length") == 64
    assert field("llama.block_count") == 2
    assert field("llama.feed_forward_length") == 128
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.rope.dimension_count") == 16
    assert field("llama.context_length") == 2048
    assert field("llama.rope.freq_base") == pytest.approx(10000.0)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.add_bos_token") is False
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == field("llama.vocab_size") == 384
    assert tokens[field("tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert field("tokenizer.ggml.token_type")[tokens.index("<|im_start|>")] == 3  # control


def test_rotary_permutation_is_what_llama_cpp_does():
    # llama.cpp: w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)
    weights = np.arange(8 * 3).reshape(8, 3)
    permuted = permute_rotary(weights, heads=2)
    # head 0 rows [0, 1, 2, 3] -> halves (0, 1), (2, 3) interleaved -> 0, 2, 1, 3
    assert permuted[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    assert permute_rotary(np.arange(8), heads=2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def _variant(tiny_model_dir, folder, config):
    """The tiny model's tokenizer with another seeded model shape."""
    shutil.copytree(tiny_model_dir, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


SHAPES = {
    # untied head, biases on q/k/v/o (permuted too) and head_dim 32 != 64 / 4
    "llama-bias-headdim": LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        attention_bias=True,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
    ),
    "mistral": MistralConfig(
        vocab_size=384,
        **TINY_SIZES,
        num_hidden_layers=2,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_other_llama_shapes_round_trip(shape, tiny_model_dir, tmp_path):
    source = _variant(tiny_model_dir, tmp_path / "model", SHAPES[shape])
    expected, got = round_trip(source, tmp_path / "out" / "m.gguf", "f32")
    assert (expected - got).abs().max() <= TOLERANCE["f32"]
    reader = gguf.GGUFReader(tmp_path / "out" / "m.gguf")
    assert "output.weight" in {t.name for t in reader.tensors}


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
    with pytest.raises(TunelabError, match="GGUF type 'q4' is not supported; use one of f32"):
        export_gguf(tiny_model_dir, tmp_path / "x.gguf", "q4")
    with pytest.raises(TunelabError, match="not a transformers model folder .*tunelab merge"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1})
    )
    with pytest.raises(
        TunelabError,
        match="is a GPT2LMHeadModel; tunelab exports LlamaForCausalLM, MistralForCausalLM, "
        "Qwen2ForCausalLM, .*Phi3ForCausalLM to GGUF.*convert_hf_to_gguf.py",
    ):
        export_gguf(other, tmp_path / "x.gguf")
    with pytest.raises(
        TunelabError, match="'model.layers.0.self_attn.q_proj.lora_A.weight'.*Merge"
    ):
        gguf_name("model.layers.0.self_attn.q_proj.lora_A.weight")
    assert not list(tmp_path.glob("*.gguf"))


def _edited_copy(tiny_model_dir, folder, edit_config=None, edit_tokenizer=None):
    shutil.copytree(tiny_model_dir, folder)
    for name, edit in (("config.json", edit_config), ("tokenizer.json", edit_tokenizer)):
        if edit is not None:
            data = json.loads((folder / name).read_text())
            edit(data)
            (folder / name).write_text(json.dumps(data))
    return folder


def test_unsupported_tokenizers_and_configs_are_refused(tiny_model_dir, tmp_path):
    def metaspace(data):
        data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}

    def digits_split(data):
        data["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": False},
                data["pre_tokenizer"],
            ],
        }

    def rope_scaling(data):
        data["rope_parameters"] = {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}

    def small_vocab(data):
        data["vocab_size"] = 300

    cases = [
        (
            None,
            metaspace,
            r"tokenizer.json: a sentencepiece-style BPE tokenizer; tunelab exports "
            "only byte-level BPE",
        ),
        (None, digits_split, r"the pre-tokenizer \(Digits \+ ByteLevel\) is not one tunelab knows"),
        (rope_scaling, None, r"config.json: rope_type 'linear' \(rope scaling\) is not exported"),
        (small_vocab, None, r"token id 383 is outside the model's vocab_size 300"),
    ]
    for index, (edit_config, edit_tokenizer, message) in enumerate(cases):
        folder = _edited_copy(tiny_model_dir, tmp_path / str(index), edit_config, edit_tokenizer)
        with pytest.raises(TunelabError, match=message):
            export_gguf(folder, tmp_path / "x.gguf")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(TunelabError, match="has no tokenizer.json; GGUF export needs a fast"):
        export_gguf(folder, tmp_path / "x.gguf")


@pytest.mark.slow
def test_default_model_exports_to_q8_0(tmp_path):
    from tunelab.models import resolve_model

    expected, got = round_trip(resolve_model(None), tmp_path / "smollm2-q8_0.gguf", "q8_0")
    # measured: max |diff| 1.17 on logits of magnitude up to 36; 17 of 19 positions keep the
    # same top token (the other two are near-ties), and every original top token stays in the
    # quantised model's top 3
    assert (expected - got).abs().max() < 2.0
    assert (expected.argmax(-1) == got.argmax(-1)).float().mean() >= 0.85
    top3 = got.topk(3, dim=-1).indices
    assert (top3 == expected.argmax(-1, keepdim=True)).any(-1).all()
