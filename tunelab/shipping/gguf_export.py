"""Write a transformers Llama-family model folder as one GGUF file (weights, tokenizer, chat
template), readable by llama.cpp and by transformers' own GGUF loader.

What llama.cpp's converter does for Llama, kept to what tunelab ships: the tensor names, the
rotary permutation of the query and key weights, a byte-level BPE tokenizer, and f32/f16/bf16
or q8_0 weights. Norms and other 1-D tensors stay f32, as llama.cpp keeps them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import TunelabError

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str) -> str:
    """The GGUF tensor name of a transformers Llama parameter."""
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        block, module, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
        if module in _LAYER_NAMES:
            return f"blk.{block}.{_LAYER_NAMES[module]}.{kind}"
    raise TunelabError(f"the model has a tensor {name!r} that tunelab's GGUF export cannot map.")


def permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout of a query/key projection: each head's rotary halves interleaved."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tokenizer_metadata(folder: Path, vocab_size: int) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TunelabError(
            f"{folder} has no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer."
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise TunelabError(
            f"{folder}: only byte-level BPE tokenizers (GPT-2 / Llama-3 / SmolLM style) export to "
            "GGUF here; this one is a "
            f"{model.get('type', 'unknown')} tokenizer. Use llama.cpp's convert_hf_to_gguf.py."
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until a real token claims the id
    for token, index in vocab.items():
        tokens[index] = token
        special = added.get(token, {}).get("special")
        types[index] = 3 if special else (4 if token in added else 1)  # control/user/normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def export_gguf(model_dir: str | Path, out_file: str | Path, out_type: str = "f16") -> Path:
    """Write ``model_dir`` (a transformers Llama-family folder) to ``out_file`` as GGUF."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunelab.files import ensure_free_space

    folder, out_file = Path(model_dir), Path(out_file)
    if out_type not in OUT_TYPES:
        raise TunelabError(
            f"GGUF type {out_type!r} is not supported; use one of {', '.join(OUT_TYPES)}."
        )
    if not (folder / "config.json").is_file():
        raise TunelabError(f"{folder} is not a transformers model folder (no config.json).")
    config = AutoConfig.from_pretrained(folder)
    architecture = (config.architectures or ["?"])[0]
    if architecture not in SUPPORTED:
        raise TunelabError(
            f"{folder} is a {architecture}; tunelab exports {', '.join(SUPPORTED)} to GGUF. For "
            "other architectures use llama.cpp's convert_hf_to_gguf.py on the merged folder."
        )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    ensure_free_space(
        out_file.parent if out_file.parent.exists() else Path.cwd(),
        sum(t.numel() * 2 for t in state.values()),
        "the GGUF file",
    )
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name(Path(folder).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[out_type])

    meta = _tokenizer_metadata(folder, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    for setter, token_id in (
        ("add_bos_token_id", tokenizer.bos_token_id),
        ("add_eos_token_id", tokenizer.eos_token_id),
        ("add_unk_token_id", tokenizer.unk_token_id),
        ("add_pad_token_id", tokenizer.pad_token_id),
    ):
        if token_id is not None:
            getattr(writer, setter)(token_id)
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for name, tensor in state.items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        data = tensor.detach().to(torch.float32).numpy()
        target = gguf_name(name)
        if target.endswith("attn_q.weight"):
            data = permute_rotary(data, heads)
        elif target.endswith("attn_k.weight"):
            data = permute_rotary(data, kv_heads)
        _add(writer, target, data, out_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def _add(writer: Any, name: str, data: np.ndarray, out_type: str) -> None:
    import gguf

    if data.ndim < 2 or out_type == "f32":
        writer.add_tensor(name, data.astype(np.float32))
        return
    if out_type == "q8_0" and data.shape[-1] % 32 == 0:
        quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return
    if out_type == "bf16":
        quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16)
        writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.BF16)
        return
    writer.add_tensor(name, data.astype(np.float16))  # f16, and q8_0's odd-sized rows
