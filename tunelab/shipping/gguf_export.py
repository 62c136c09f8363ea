"""Write a transformers model folder as one GGUF file (weights, tokenizer, chat template,
end-of-turn and padding tokens), readable by llama.cpp and by transformers' own GGUF loader.

What llama.cpp's converter does for the Llama, Mistral, Qwen2, Qwen3, Gemma 2/3 and Phi-3
families (their quirks in ``gguf_families``), kept to what tunelab ships: the tensor names, the
rotary permutation where llama.cpp needs it, a byte-level BPE tokenizer, and f32, f16, bf16 or
q8_0 weights written here; k-quants (q4_k_m, ...) are made from an f32 file by llama.cpp's own
quantizer (llama-cpp-python). Norms and other 1-D tensors stay f32, as llama.cpp keeps them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import TunelabError
from tunelab.shipping.c_output import captured_c_output, quantize_summary
from tunelab.shipping.gguf_families import FAMILIES, Family, global_rope_theta, rope_type
from tunelab.template_sandbox import render_chat

logger = logging.getLogger(__name__)


WRITTEN_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's quantizer makes these from an f32 file (its LLAMA_FTYPE_MOSTLY_* names)
K_QUANTS = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
OUT_TYPES = WRITTEN_TYPES + tuple(K_QUANTS)
SUPPORTED = tuple(FAMILIES)
_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
# The Llama-3 split pattern as tokenizer.json spells it; llama.cpp calls this pre-tokenizer
# "llama-bpe".
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # llama.cpp: "qwen2"
# llama.cpp's token types: 1 normal, 2 unknown, 3 control (special), 4 user-defined (added),
# 5 unused, 6 byte (<0x41>)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def export_gguf(
    model_dir: str | Path,
    out_file: str | Path,
    out_type: str = "f16",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Write ``model_dir`` (a transformers folder of a family in ``SUPPORTED`` with a byte-level
    BPE tokenizer.json) to ``out_file`` as GGUF with weights of ``out_type`` (one of
    ``OUT_TYPES``). Returns the file's path. Adapters must be merged first. k-quants need
    llama-cpp-python (TunelabError says how to install it when it is missing).

    An existing ``out_file`` is replaced only with ``overwrite`` and only when it is a GGUF
    file (never the user's other files); TunelabError otherwise."""
    import gguf
    import torch

    from tunelab.files import disk_full_errors, ensure_free_space
    from tunelab.models import (
        ensure_pad_token,
        load_model,
        load_model_config,
        load_saved_tokenizer,
    )

    folder, out_file = Path(model_dir), Path(out_file)
    if out_type not in OUT_TYPES:
        raise TunelabError(
            f"GGUF type {out_type!r} is not supported; use one of {', '.join(OUT_TYPES)}."
        )
    if out_type in K_QUANTS:
        _llama_cpp("make a k-quant file")  # fail before the slow part when it is missing
    if not (folder / "config.json").is_file():
        raise TunelabError(
            f"{folder} is not a transformers model folder (no config.json). Export a merged "
            "model folder (tunelab merge RUN_DIR OUT_DIR) or a run folder via tunelab export."
        )
    if check_gguf_target(out_file, folder, overwrite):
        logger.info("Replacing the GGUF file %s.", out_file)
    from tunelab.runs import check_run_files

    check_run_files(folder)  # a cut-off tokenizer.json or weights file is named, not parsed
    config = load_model_config(str(folder), trust_remote_code)
    family = _check_architecture(folder, config)
    tokenizer_meta = _tokenizer_metadata(folder, config.vocab_size)
    model = load_model(str(folder), torch.float32, trust_remote_code)
    tokenizer = load_saved_tokenizer(str(folder), trust_remote_code)
    ensure_pad_token(tokenizer)  # the padding tunelab trained and generates with
    state = model.state_dict()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    written_type = "f32" if out_type in K_QUANTS else out_type
    needed = sum(t.numel() for t in state.values()) * _BYTES_PER_WEIGHT[written_type]
    ensure_free_space(out_file.parent, int(needed), "the GGUF file")

    # Written under a temporary name and renamed, so an interrupted export leaves no file that
    # looks complete.
    partial = out_file.with_name(f".{out_file.name}.partial")
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    try:
        with disk_full_errors(out_file.parent, "the GGUF file", int(needed)):
            writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[arch])
            _write_hyperparameters(writer, config, folder.resolve().name, written_type)
            family.extra(writer, config, str(folder))
            _write_tokenizer(writer, tokenizer, tokenizer_meta)
            tied = bool(getattr(config, "tie_word_embeddings", False))
            heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
            names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
            for name, tensor in state.items():
                if name == "lm_head.weight" and tied:
                    continue  # llama.cpp and transformers reuse token_embd without output.weight
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                data = tensor.detach().to(torch.float32).numpy()
                target = gguf_name(name, family, names)
                if family.permute_rotary and ".attn_q." in target:
                    data = permute_rotary(data, heads)
                elif family.permute_rotary and ".attn_k." in target:
                    data = permute_rotary(data, kv_heads)
                if family.norm_offset and target.endswith("norm.weight"):
                    data = data + family.norm_offset
                _add_tensor(writer, target, data, written_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            with partial.open("rb") as written:
                os.fsync(written.fileno())
            if out_type in K_QUANTS:
                quantize_with_llama_cpp(partial, out_file, out_type)
            else:
                os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)  # a half-written export is never left behind
    return out_file


def quantize_with_llama_cpp(source: Path, out_file: Path, out_type: str) -> Path:
    """``source`` (an f32/f16 GGUF file) quantized to ``out_type`` (a key of ``K_QUANTS``) by
    llama.cpp's own quantizer, written under a temporary name and renamed."""
    llama_cpp = _llama_cpp(f"quantize to {out_type}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{K_QUANTS[out_type]}")
    params.nthread = max(1, (os.cpu_count() or 1))
    partial = out_file.with_name(f".{out_file.name}.quantizing")
    # It prints a line per tensor from C; caught here and summed up in one line.
    with captured_c_output() as printed:
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(partial).encode(), llama_cpp.byref(params)
        )
    if status != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        said = "\n".join(printed[-5:])
        raise TunelabError(
            f"llama.cpp's quantizer could not make a {out_type} file from {source} (status "
            f"{status}); export f16 or q8_0 instead, or run llama-quantize yourself."
            + (f" It said:\n{said}" if said else "")
        )
    import gguf

    summary = quantize_summary(printed, out_type, len(gguf.GGUFReader(source).tensors))
    if summary:
        logger.warning(summary)
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


def _llama_cpp(purpose: str) -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise TunelabError(
            f"to {purpose} tunelab uses llama.cpp itself, through llama-cpp-python, which is not "
            "installed. Install it with: pip install 'tunelab[gguf]' (builds llama.cpp; several "
            "minutes on a small machine)."
        ) from None
    return llama_cpp


_LLAMA_NAMES: Any = None


def gguf_name(name: str, family: Family | None = None, names: Any = None) -> str:
    """The GGUF tensor name of a transformers parameter, from llama.cpp's own table in the
    ``gguf`` package (Llama: ``model.layers.0.mlp.up_proj.weight`` -> ``blk.0.ffn_up.weight``)."""
    import gguf

    global _LLAMA_NAMES
    if names is None:
        if _LLAMA_NAMES is None:
            _LLAMA_NAMES = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1024)
        names = _LLAMA_NAMES
    target = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if target is None:
        raise TunelabError(
            f"the model has a tensor {name!r} that tunelab's GGUF export cannot map (is it an "
            "unmerged adapter?). Merge adapters first, or use llama.cpp's convert_hf_to_gguf.py."
        )
    return target


def permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout of a query/key projection (weight or bias): within each head, the two
    rotary halves interleaved, because llama.cpp rotates adjacent pairs where transformers rotates
    the halves. Loaders (llama.cpp, transformers) undo it."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _check_architecture(folder: Path, config: Any) -> Family:
    architecture = (getattr(config, "architectures", None) or ["(none)"])[0]
    if architecture not in FAMILIES:
        raise TunelabError(
            f"{folder} is a {architecture}; tunelab exports {', '.join(SUPPORTED)} to GGUF. For "
            "other architectures run llama.cpp's convert_hf_to_gguf.py on the merged folder."
        )
    kind = rope_type(config)
    if kind != "default":
        raise TunelabError(
            f"{folder}/config.json: rope_type {kind!r} (rope scaling) is not exported by "
            "tunelab; only unscaled rotary embeddings are. Use llama.cpp's convert_hf_to_gguf.py."
        )
    return FAMILIES[architecture]


def _write_hyperparameters(writer: Any, config: Any, name: str, out_type: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if getattr(config, "partial_rotary_factor", None) in (None, 1.0):
        writer.add_rope_dimension_count(head_dim)  # else the family writes its own
    writer.add_rope_freq_base(global_rope_theta(config))
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
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _sentencepiece_metadata(path, data, vocab_size)
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        kind = "sentencepiece-style " if "Metaspace" in json.dumps(data) else ""
        raise TunelabError(
            f"{path}: a {kind}{model.get('type', 'unknown')} tokenizer; tunelab exports only "
            "byte-level BPE tokenizers (GPT-2, Llama-3, SmolLM style) to GGUF. Use llama.cpp's "
            "convert_hf_to_gguf.py on the merged folder."
        )
    vocab, added = _vocab_with_added(path, data, vocab_size)
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


def _vocab_with_added(
    path: Path, data: dict[str, Any], vocab_size: int
) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """tokenizer.json's vocabulary with its added tokens (token -> id), and the added tokens
    by content; TunelabError when an id does not fit the model's embedding rows."""
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    if max(vocab.values()) >= vocab_size:
        raise TunelabError(
            f"{path}: token id {max(vocab.values())} is outside the model's vocab_size "
            f"{vocab_size} (config.json); resize the embeddings to the tokenizer before export."
        )
    return vocab, added


def _sentencepiece_metadata(path: Path, data: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """A sentencepiece-style BPE (byte fallback, spaces as ``▁``: Llama 2, Mistral, Gemma,
    Phi-3) as llama.cpp's ``llama`` tokenizer: tokens, scores and types. llama.cpp merges the
    pair whose merged token scores highest, so a token made by merge number r scores -r, which
    replays the merges in the order tokenizer.json lists them."""
    model = data["model"]
    normalizer, pre = data.get("normalizer"), data.get("pre_tokenizer")
    steps = json.dumps([normalizer, pre])
    if "Metaspace" in steps:
        scheme = (pre or {}).get("prepend_scheme", "always")
        if scheme == "first":
            # llama.cpp puts a space before the text after every special token, which
            # tokenizers' "first" scheme does not: chat prompts would tokenize differently
            raise TunelabError(
                f"{path}: the Metaspace pre-tokenizer prepends '▁' only at the start "
                "(prepend_scheme 'first'), which llama.cpp cannot reproduce after special "
                "tokens. Use llama.cpp's convert_hf_to_gguf.py on the merged folder."
            )
        prefix = scheme == "always"
    elif '"Replace"' in steps and "\u2581" in json.dumps(normalizer, ensure_ascii=False):
        prefix = '"Prepend"' in steps
    else:
        raise TunelabError(
            f"{path}: a byte-fallback BPE tokenizer that does not mark spaces with '▁' "
            "(no Metaspace pre-tokenizer or Replace normalizer); llama.cpp would split it "
            "differently. Use llama.cpp's convert_hf_to_gguf.py on the merged folder."
        )
    vocab, added = _vocab_with_added(path, data, vocab_size)
    rank: dict[str, int] = {}
    for index, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, index)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1e9] * vocab_size
    types = [_UNUSED] * vocab_size
    unknown = model.get("unk_token")
    for token, index in vocab.items():
        tokens[index] = token
        scores[index] = -float(rank.get(token, 0))
        if token == unknown:
            types[index] = _UNKNOWN
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types[index] = _BYTE  # byte fallback, whether listed as added tokens or not
        elif token in added:
            types[index] = _CONTROL if added[token].get("special") else _USER_DEFINED
        else:
            types[index] = _NORMAL
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "prefix": prefix}


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
    elif kinds == ["Split", "ByteLevel"]:
        pattern = steps[0].get("pattern", {}).get("Regex")
        name = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
    if name is None or normalizer is not None:
        raise TunelabError(
            f"{path}: the pre-tokenizer ({' + '.join(map(str, kinds))}"
            f"{', with a normalizer' if normalizer is not None else ''}) is not one tunelab "
            "knows how to name for llama.cpp (GPT-2, SmolLM or Llama-3 splits). Use llama.cpp's "
            "convert_hf_to_gguf.py on the merged folder."
        )
    return name


def _write_tokenizer(writer: Any, tokenizer: Any, meta: dict[str, Any]) -> None:
    if meta.get("model") == "llama":  # sentencepiece-style
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(meta["tokens"])
        writer.add_token_scores(meta["scores"])
        writer.add_token_types(meta["types"])
        writer.add_add_space_prefix(meta["prefix"])
    else:
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
    end_of_turn = end_of_turn_id(tokenizer)
    if end_of_turn is not None and end_of_turn != tokenizer.eos_token_id:
        writer.add_eot_token_id(end_of_turn)  # llama.cpp stops at EOS and at EOT
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``), found by rendering a turn; None without a
    template or when the turn ends in plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "tunelab-answer-marker"
    try:
        text = render_chat(
            tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
        )
    except Exception:  # noqa: BLE001 - a template that cannot render a turn has no answer end
        return None
    after = text[text.rfind(marker) + len(marker) :].lstrip()
    specials = sorted(
        (t for t in tokenizer.get_added_vocab() if t and after.startswith(t)), key=len
    )
    return tokenizer.convert_tokens_to_ids(specials[-1]) if specials else None


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
