"""Write a transformers Llama-family model folder as one GGUF file (weights, tokenizer, chat
template), readable by llama.cpp and by transformers' own GGUF loader.

What llama.cpp's converter does for Llama, kept to what tunelab ships: the tensor names, the
rotary permutation of the query and key projections, a byte-level BPE tokenizer, and f32, f16,
bf16 or q8_0 weights. Norms and other 1-D tensors stay f32, as llama.cpp keeps them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import TunelabError

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")
_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
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
# The Llama-3 split pattern as tokenizer.json spells it; llama.cpp calls this pre-tokenizer
# "llama-bpe".
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's token types: 1 normal, 3 control (special), 4 user-defined (added), 5 unused
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def export_gguf(
    model_dir: str | Path,
    out_file: str | Path,
    out_type: str = "f16",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write ``model_dir`` (a transformers LlamaForCausalLM or MistralForCausalLM folder with a
    byte-level BPE tokenizer.json) to ``out_file`` as GGUF with weights of ``out_type``
    (f32, f16, bf16 or q8_0). Returns the file's path. Adapters must be merged first.

    An existing ``out_file`` is replaced only with ``overwrite`` and only when it is a GGUF
    file (never the user's other files); TunelabError otherwise."""
    import gguf
    import torch

    from tunelab.files import ensure_free_space
    from tunelab.models import load_model, load_model_config, load_saved_tokenizer

    folder, out_file = Path(model_dir), Path(out_file)
    if out_type not in OUT_TYPES:
        raise TunelabError(
            f"GGUF type {out_type!r} is not supported; use one of {', '.join(OUT_TYPES)}."
        )
    if not (folder / "config.json").is_file():
        raise TunelabError(
            f"{folder} is not a transformers model folder (no config.json). Export a merged "
            "model folder (tunelab merge RUN_DIR OUT_DIR) or a run folder via tunelab export."
        )
    if check_gguf_target(out_file, folder, overwrite):
        print(f"Replacing the GGUF file {out_file}.")
    config = load_model_config(str(folder), trust_remote_code)
    _check_architecture(folder, config)
    tokenizer_meta = _tokenizer_metadata(folder, config.vocab_size)
    model = load_model(str(folder), torch.float32, trust_remote_code)
    tokenizer = load_saved_tokenizer(str(folder), trust_remote_code)
    state = model.state_dict()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    needed = sum(t.numel() for t in state.values()) * _BYTES_PER_WEIGHT[out_type]
    ensure_free_space(out_file.parent, int(needed), "the GGUF file")

    # Written under a temporary name and renamed, so an interrupted export leaves no file that
    # looks complete.
    partial = out_file.with_name(f".{out_file.name}.partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    _write_hyperparameters(writer, config, folder.resolve().name, out_type)
    _write_tokenizer(writer, tokenizer, tokenizer_meta)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for name, tensor in state.items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp and transformers reuse token_embd when output.weight is absent
        data = tensor.detach().to(torch.float32).numpy()
        target = gguf_name(name)
        if ".attn_q." in target:
            data = permute_rotary(data, heads)
        elif ".attn_k." in target:
            data = permute_rotary(data, kv_heads)
        _add_tensor(writer, target, data, out_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, out_file)
    return out_file


def check_gguf_target(out_file: Path, model_dir: Path, overwrite: bool) -> bool:
    """Refuse an output path that is a folder, one of the model folder's own files, or an
    existing file that is not GGUF; an existing GGUF file needs ``overwrite``. Returns whether
    a file will be replaced."""
    if out_file.is_dir():
        raise TunelabError(f"--out {out_file} is a folder. Give a file path ending in .gguf.")
    if not (out_file.exists() or out_file.is_symlink()):
        return False
    if out_file.resolve().parent == model_dir.resolve() and out_file.suffix.lower() != ".gguf":
        raise TunelabError(
            f"--out {out_file} is one of the model's own files. Give a new .gguf path."
        )
    with out_file.open("rb") as handle:
        is_gguf = handle.read(4) == b"GGUF"
    if not is_gguf:
        raise TunelabError(
            f"--out {out_file} exists and is not a GGUF file, so tunelab will not replace it. "
            "Choose another output path."
        )
    if not overwrite:
        raise TunelabError(
            f"--out {out_file} already exists (a GGUF file). Pass --overwrite to replace it, or "
            "choose another path with --out."
        )
    return True


def gguf_name(name: str) -> str:
    """The GGUF tensor name of a transformers Llama parameter (``model.layers.0.mlp.up_proj
    .weight`` -> ``blk.0.ffn_up.weight``)."""
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
    raise TunelabError(
        f"the model has a tensor {name!r} that tunelab's GGUF export cannot map (is it an "
        "unmerged adapter?). Merge adapters first, or use llama.cpp's convert_hf_to_gguf.py."
    )


def permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout of a query/key projection (weight or bias): within each head, the two
    rotary halves interleaved, because llama.cpp rotates adjacent pairs where transformers rotates
    the halves. Loaders (llama.cpp, transformers) undo it."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _check_architecture(folder: Path, config: Any) -> None:
    architecture = (getattr(config, "architectures", None) or ["(none)"])[0]
    if architecture not in SUPPORTED:
        raise TunelabError(
            f"{folder} is a {architecture}; tunelab exports {', '.join(SUPPORTED)} to GGUF. For "
            "other architectures run llama.cpp's convert_hf_to_gguf.py on the merged folder."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise TunelabError(
            f"{folder}/config.json: rope_type {rope_type!r} (rope scaling) is not exported by "
            "tunelab; only unscaled rotary embeddings are. Use llama.cpp's convert_hf_to_gguf.py."
        )


def _write_hyperparameters(writer: Any, config: Any, name: str, out_type: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:
        # llama.cpp assumes hidden_size / heads otherwise (Mistral-Nemo-style configs differ)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
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
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tokenizer_metadata(folder: Path, vocab_size: int) -> dict[str, Any]:
    """Tokens, token types, merges and llama.cpp's pre-tokenizer name from tokenizer.json."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TunelabError(
            f"{folder} has no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer. "
            "Save the tokenizer with the model (tokenizer.save_pretrained) and retry."
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        kind = "sentencepiece-style " if "Metaspace" in json.dumps(data) else ""
        raise TunelabError(
            f"{path}: a {kind}{model.get('type', 'unknown')} tokenizer; tunelab exports only "
            "byte-level BPE tokenizers (GPT-2, Llama-3, SmolLM style) to GGUF. Use llama.cpp's "
            "convert_hf_to_gguf.py on the merged folder."
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    if max(vocab.values()) >= vocab_size:
        raise TunelabError(
            f"{path}: token id {max(vocab.values())} is outside the model's vocab_size "
            f"{vocab_size} (config.json); resize the embeddings to the tokenizer before export."
        )
    # llama.cpp wants one token per embedding row; rows no token uses get a placeholder
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
        if token in added:
            types[index] = _CONTROL if added[token].get("special") else _USER_DEFINED
        else:
            types[index] = _NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "pre": _pre_tokenizer_name(path, data.get("pre_tokenizer"), data.get("normalizer")),
    }


def _pre_tokenizer_name(path: Path, pre: dict[str, Any], normalizer: Any) -> str:
    """llama.cpp's name for how text is split before BPE; an unknown split would tokenize
    differently in llama.cpp, so it is refused rather than guessed."""
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    name = None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        name = "gpt-2"
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        name = "smollm"
    elif kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == (
        _LLAMA3_SPLIT
    ):
        name = "llama-bpe"
    if name is None or normalizer is not None:
        raise TunelabError(
            f"{path}: the pre-tokenizer ({' + '.join(map(str, kinds))}"
            f"{', with a normalizer' if normalizer is not None else ''}) is not one tunelab "
            "knows how to name for llama.cpp (GPT-2, SmolLM or Llama-3 splits). Use llama.cpp's "
            "convert_hf_to_gguf.py on the merged folder."
        )
    return name


def _write_tokenizer(writer: Any, tokenizer: Any, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
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
    # Say whether the tokenizer puts BOS in front, so llama.cpp tokenizes prompts the same way.
    first = tokenizer("a")["input_ids"][:1]
    writer.add_add_bos_token(
        tokenizer.bos_token_id is not None and first == [tokenizer.bos_token_id]
    )
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _add_tensor(writer: Any, name: str, data: np.ndarray, out_type: str) -> None:
    import gguf

    if data.ndim < 2 or out_type == "f32":
        writer.add_tensor(name, data.astype(np.float32))
        return
    kind = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}.get(
        out_type
    )
    # q8_0 packs rows in blocks of 32; a row of another length falls back to f16, as in llama.cpp
    if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 != 0:
        kind = None
    if kind is None:
        writer.add_tensor(name, data.astype(np.float16))
        return
    writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
