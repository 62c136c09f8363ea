"""Load a run folder or a model for inference, and generate from it.

A run folder generates with the same chat template and system prompt it trained with (both
saved in the folder), so what the model sees at inference matches what it learned on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.tokenize import bos_text, render_prompt, uses_chat_template, with_bos
from tunelab.errors import TunelabError
from tunelab.run_folder import ADAPTER_CONFIG, CONFIG, read_run_info
from tunelab.runs.checks import check_run_files
from tunelab.template_sandbox import render_chat
from tunelab.text_safety import visible


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    chat: bool
    system_prompt: str | None
    source: str


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_for_inference(
    target: str,
    precision: str = "fp32",
    use_adapter: bool = True,
    device: str | None = None,
    trust_remote_code: bool | None = None,
) -> LoadedModel:
    """A run folder (base model + its adapter) or a plain model name, ready to generate.

    ``use_adapter=False`` loads a run's base model alone, for base-vs-tuned comparisons.
    fp32 is the default so results match plain transformers + peft to 1e-4.
    ``trust_remote_code``: None takes a run's own setting (False for a plain model).
    """
    from tunelab.device import choose_placement
    from tunelab.models import (
        load_adapter,
        load_model,
        load_tokenizer,
        resolve_model,
        run_trust_remote_code,
    )

    if trust_remote_code is None:
        trust_remote_code = Path(target).is_dir() and run_trust_remote_code(target)

    placement = choose_placement(precision, device)
    if Path(target).is_dir():
        check_run_files(target)  # a save cut off by a full disk is named, not parsed
    if is_run_dir(target):
        folder = Path(target)
        adapter_config = json.loads((folder / ADAPTER_CONFIG).read_text())
        base = adapter_config.get("base_model_name_or_path")
        info = read_run_info(folder)
        if not base or not (Path(base).exists() or "/" in base):
            raise TunelabError(
                f"{folder}/adapter_config.json names base model {base!r}, which cannot be "
                "found. Edit base_model_name_or_path there to point at the base model folder."
            )
        tokenizer = load_tokenizer(str(folder), trust_remote_code)
        quantization = _run_quantization(folder, placement.dtype) if use_adapter else None
        model = load_model(
            base,
            placement.dtype,
            trust_remote_code,
            device=placement.device,
            quantization_config=quantization,
        )
        if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))  # the run added tokens
        if quantization is not None:
            from tunelab.methods import keep_4bit_format

            keep_4bit_format(model)
        if use_adapter:
            model = load_adapter(model, folder)
        chat = bool(info.get("chat", getattr(tokenizer, "chat_template", None)))
        return LoadedModel(model, tokenizer, chat, info.get("system_prompt"), str(folder))
    if (Path(target) / CONFIG).is_file() and not (Path(target) / "config.json").exists():
        raise TunelabError(
            f"{target} is a tunelab run that did not finish: it has no saved model "
            "(adapter_config.json). Its training stopped or its final save failed; "
            f"'tunelab doctor {target}' shows why. Continue it with 'tunelab train CONFIG "
            "--resume' (from its last checkpoint) or train again."
        )
    if Path(target).is_dir() and not (Path(target) / "config.json").exists():
        raise TunelabError(
            f"{target} is neither a tunelab run folder (no adapter_config.json) nor a model "
            "folder (no config.json). Pass the output_dir of a finished 'tunelab train'."
        )
    location = resolve_model(target)
    tokenizer = load_tokenizer(location, trust_remote_code)
    model = load_model(location, placement.dtype, trust_remote_code, device=placement.device)
    # a full fine-tuning run or a merged model keeps the chat settings it was trained with
    info = read_run_info(location)
    chat = info.get("chat", uses_chat_template(tokenizer, "auto"))
    return LoadedModel(model, tokenizer, bool(chat), info.get("system_prompt"), location)


def _run_quantization(folder: Path, dtype: Any) -> Any:
    """A QLoRA run is served on the same quantised base it trained on."""
    from tunelab.config import load_config

    config_path = folder / CONFIG
    if not config_path.is_file():
        return None
    config = load_config(config_path)
    if config.method != "qlora":
        return None
    from tunelab.methods import quantization_config

    return quantization_config(config, dtype)


def generate(
    loaded: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int | None = None,
    seed: int | None = None,
    batch_size: int = 8,
    repetition_penalty: float = 1.0,
) -> list[str]:
    """Answers to ``prompts`` (greedy by default), batched with left padding and a KV cache."""
    texts = [render_prompt(loaded.tokenizer, p, loaded.chat, loaded.system_prompt) for p in prompts]
    return generate_from_text(
        loaded,
        texts,
        max_new_tokens,
        do_sample,
        temperature,
        top_p,
        top_k,
        seed,
        batch_size,
        repetition_penalty,
    )


def _options(
    tokenizer: Any,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    top_k: int | None,
    repetition_penalty: float,
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "repetition_penalty": repetition_penalty,
    }
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
        if top_k is not None:
            options["top_k"] = top_k
    else:  # greedy: silence the sampling defaults a model's generation config may carry
        options.update(temperature=None, top_p=None, top_k=None)
    return options


def stream_answer(
    loaded: LoadedModel, prompt: str, max_new_tokens: int = 128, repetition_penalty: float = 1.0
) -> Iterator[str]:
    """The greedy answer to one prompt (rendered as in training), yielded piece by piece as
    the tokens come; the same text ``generate`` returns, unstripped."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    tokenizer, model = loaded.tokenizer, loaded.model
    text = render_prompt(tokenizer, prompt, loaded.chat, loaded.system_prompt)
    encoded = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    encoded = {k: v.to(next(model.parameters()).device) for k, v in encoded.items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    options = _options(tokenizer, max_new_tokens, False, 0.7, 0.9, None, repetition_penalty)

    def run() -> None:
        with torch.no_grad():
            model.generate(**encoded, **options, streamer=streamer)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    yield from streamer
    worker.join()


def generate_from_text(
    loaded: LoadedModel,
    texts: list[str],
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int | None = None,
    seed: int | None = None,
    batch_size: int = 8,
    repetition_penalty: float = 1.0,
) -> list[str]:
    """Continuations of already-rendered prompt texts (``repetition_penalty`` > 1 discourages
    the loops small models fall into under greedy decoding)."""
    import torch

    tokenizer, model = loaded.tokenizer, loaded.model
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer.padding_side = "left"  # new tokens must follow each prompt directly
    options = _options(
        tokenizer, max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty
    )
    answers = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = {k: v.to(device) for k, v in encoded.items()}
        with torch.no_grad():
            output = model.generate(**encoded, **options)
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def chat_loop(
    loaded: LoadedModel,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    input_fn: Any = input,
    output_fn: Any = print,
) -> None:
    """An interactive chat on the terminal; '/reset' clears the history, '/exit' or EOF ends."""
    history: list[dict[str, str]] = []
    output_fn(f"Chatting with {loaded.source}. Type /reset to start over, /exit to quit.")
    while True:
        try:
            line = input_fn("you> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = []
            output_fn("(history cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        if loaded.chat:
            messages = list(history)
            if loaded.system_prompt:
                messages.insert(0, {"role": "system", "content": loaded.system_prompt})
            text = render_chat(loaded.tokenizer, messages, add_generation_prompt=True)
        else:  # no template: the conversation so far as plain text, started as training starts it
            text = "\n".join(m["content"] for m in history) + "\n"
            text = with_bos(bos_text(loaded.tokenizer), text)
        answer = generate_from_text(loaded, [text], max_new_tokens, do_sample, temperature, top_p)[
            0
        ]
        history.append({"role": "assistant", "content": answer})
        output_fn(f"model> {visible(answer)}")  # escapes the model learned are shown, not run
