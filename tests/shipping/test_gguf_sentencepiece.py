"""Sentencepiece-style tokenizers (byte-fallback BPE with '▁' for spaces: Llama 2, Phi-3,
Gemma, Mistral) exported as llama.cpp's "llama" tokenizer: llama.cpp tokenizes like
transformers, chat prompts included."""

import json
import shutil

import pytest
import torch
from conftest import CORPUS, TINY_SIZES
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tunelab.errors import TunelabError
from tunelab.shipping.gguf_export import export_gguf

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "What does a compiler do? héllo 1234 日本",
    "two  spaces\nnew line\t tab",
    "<|im_start|>user\nWhat is a byte?<|im_end|>\n<|im_start|>assistant\nEight bits.<|im_end|>",
]


def sentencepiece_model(folder, style):
    """A tiny Llama with a byte-fallback BPE tokenizer: ``legacy`` marks spaces in the
    normalizer with a leading '▁' (Llama 2, Phi-3), ``gemma`` without the leading '▁',
    ``first`` with a Metaspace pre-tokenizer that prepends only at the start."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if style == "first":
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        steps = [normalizers.Replace(" ", "▁")]
        if style == "legacy":
            steps.insert(0, normalizers.Prepend("▁"))
        bpe.normalizer = normalizers.Sequence(steps)
    bpe.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS + byte_tokens)
    bpe.train_from_iterator([t.replace(" ", "▁") for t in CORPUS], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), **TINY_SIZES, num_hidden_layers=1, tie_word_embeddings=True
    )
    shutil.rmtree(folder, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


@pytest.mark.parametrize("style", ["legacy", "gemma"])
def test_llama_cpp_tokenizes_like_transformers(style, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    import gguf

    folder, tokenizer = sentencepiece_model(tmp_path / "model", style)
    out = export_gguf(folder, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(out)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() == (style == "legacy")
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    for text in TEXTS:
        want = tokenizer(text, add_special_tokens=False).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    # a byte-fallback character is written as its <0xNN> tokens, typed as bytes (6)
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tokenizer.convert_tokens_to_ids("<0xE6>")] == 6


def test_prepend_only_at_the_start_is_refused(tmp_path):
    folder, _ = sentencepiece_model(tmp_path / "model", "first")
    with pytest.raises(TunelabError, match="prepend_scheme 'first'.*convert_hf_to_gguf"):
        export_gguf(folder, tmp_path / "m.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf"))
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = None  # spaces not marked at all
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TunelabError, match="does not mark spaces"):
        export_gguf(folder, tmp_path / "m.gguf", "f16")
