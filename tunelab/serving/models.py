"""Runs and models to serve: several run folders' adapters on one shared base model.

Each run keeps its own tokenizer (chat template, end-of-turn token) and system prompt, so a
request to a run is rendered exactly as that run trained and as ``tunelab generate`` renders it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.tokenize import uses_chat_template
from tunelab.errors import TunelabError
from tunelab.generation import LoadedModel, is_run_dir, load_for_inference
from tunelab.models import add_adapter, load_tokenizer, resolve_model, run_trust_remote_code
from tunelab.run_folder import ADAPTER_CONFIG, CONFIG, read_run_info

BASE_ADAPTER = None  # the adapter name under which a request runs on the bare base model


@dataclass
class ServedModel:
    """One model name of the API: a run's adapter on the shared base, or the base alone."""

    name: str
    adapter: str | None  # peft adapter name, or BASE_ADAPTER
    tokenizer: Any
    chat: bool
    system_prompt: str | None
    source: str


@dataclass
class ModelPool:
    """The shared model (a PeftModel when runs are served) and every served name."""

    model: Any
    served: dict[str, ServedModel]
    context_length: int

    def get(self, name: str) -> ServedModel | None:
        return self.served.get(name)


def _run_base(folder: Path) -> str:
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    return str(config.get("base_model_name_or_path"))


def _method(folder: Path) -> str:
    from tunelab.config import load_config

    path = folder / CONFIG
    return load_config(path).method if path.is_file() else "lora"


def load_pool(targets: list[str], precision: str = "fp32", device: str | None = None) -> ModelPool:
    """Load ``targets`` (run folders trained on one base model, or one plain model) for serving.

    Every run is served under its folder name and the base model under its own name (the last
    part of its path). Raises TunelabError when the runs have different base models, when two
    names collide, or when a target is neither a run nor a model.
    """
    if not targets:
        raise TunelabError("give at least one run folder or model to serve.")
    runs = [Path(t) for t in targets if is_run_dir(t)]
    models = [t for t in targets if not is_run_dir(t)]
    if runs and models:
        raise TunelabError(
            f"serve either run folders (their base model is served too) or one model, not both: "
            f"{', '.join(models)} is not a run folder."
        )
    if len(models) > 1:
        raise TunelabError(
            f"one base model per server ({', '.join(models)} given); start one server per model."
        )
    if models:
        loaded = load_for_inference(models[0], precision, device=device)
        name = Path(loaded.source).name or models[0]
        served = {name: _served(name, BASE_ADAPTER, loaded)}
        return ModelPool(loaded.model, served, _context_length(loaded.model))

    bases = {str(run): _run_base(run) for run in runs}
    if len(set(bases.values())) > 1:
        listing = "; ".join(f"{run}: {base}" for run, base in bases.items())
        raise TunelabError(
            f"runs trained on different base models cannot share one server ({listing}). "
            "Start one server per base model."
        )
    methods = {str(run): _method(run) for run in runs}
    if "qlora" in methods.values() and len(set(methods.values())) > 1:
        raise TunelabError(
            "a QLoRA run is served on its 4-bit base, which the other runs did not train on "
            f"({methods}). Serve QLoRA runs on their own server."
        )
    names = [run.resolve().name for run in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TunelabError(
            f"two runs would be served under the same name {duplicates[0]!r}; model names are "
            "the run folders' names, so rename one folder."
        )
    first = load_for_inference(str(runs[0]), precision, device=device)
    model = first.model  # a PeftModel whose first adapter is called "default"
    served: dict[str, ServedModel] = {}
    for index, (run, name) in enumerate(zip(runs, names, strict=True)):
        adapter = "default" if index == 0 else name
        if index:
            add_adapter(model, run, adapter)
            loaded = _run_settings(run, model)
            if len(loaded.tokenizer) != len(first.tokenizer):
                raise TunelabError(
                    f"{run}: its tokenizer has {len(loaded.tokenizer)} tokens, "
                    f"{runs[0]}'s has {len(first.tokenizer)}; runs that added different tokens "
                    "cannot share one base model. Serve them separately."
                )
        else:
            loaded = first
        served[name] = _served(name, adapter, loaded)
    model.eval()
    base_name = Path(bases[str(runs[0])]).name
    if base_name in served:
        raise TunelabError(
            f"a run folder is named like its base model ({base_name!r}); rename the run folder."
        )
    base = bases[str(runs[0])]
    base_tokenizer = load_tokenizer(resolve_model(base), run_trust_remote_code(runs[0]))
    base_chat = bool(uses_chat_template(base_tokenizer, "auto"))
    served[base_name] = ServedModel(base_name, BASE_ADAPTER, base_tokenizer, base_chat, None, base)
    return ModelPool(model, served, _context_length(model))


def _served(name: str, adapter: str | None, loaded: LoadedModel) -> ServedModel:
    return ServedModel(
        name, adapter, loaded.tokenizer, loaded.chat, loaded.system_prompt, loaded.source
    )


def _run_settings(folder: Path, model: Any) -> LoadedModel:
    """A run's tokenizer, chat flag and system prompt, read as ``load_for_inference`` reads
    them, on the already loaded shared ``model``."""
    tokenizer = load_tokenizer(str(folder), run_trust_remote_code(folder))
    info = read_run_info(folder)
    chat = bool(info.get("chat", getattr(tokenizer, "chat_template", None)))
    return LoadedModel(model, tokenizer, chat, info.get("system_prompt"), str(folder))


def _context_length(model: Any) -> int:
    config = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
    return int(getattr(config, "max_position_embeddings", 2048) or 2048)
