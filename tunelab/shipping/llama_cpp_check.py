"""Prove an exported GGUF file in llama.cpp itself (through llama-cpp-python): it loads, its
greedy answer to a fixed chat prompt equals ``tunelab generate``'s, it stops at the trained
end-of-turn token, and its perplexity on held-out text is measured."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

CHECK_PROMPT = "What does a compiler do?"
HELD_OUT = (
    "A compiler translates a program written in a high-level language into machine code. "
    "The operating system schedules processes, manages memory and talks to devices."
)


@dataclass
class LlamaCppCheck:
    answer: str  # llama.cpp's greedy answer
    expected: str | None  # tunelab generate's, when the source model was given
    stopped_at_end_of_turn: bool
    perplexity: float
    prompt_ids: list[int]
    answer_ids: list[int]  # llama.cpp's new tokens, without the end-of-turn token

    @property
    def matches(self) -> bool | None:
        return None if self.expected is None else self.answer == self.expected

    def summary(self) -> str:
        if self.matches is None:
            verdict = "loaded"
        elif self.matches:
            verdict = "greedy answer equals tunelab generate's"
        else:
            verdict = f"greedy answer DIFFERS: llama.cpp {self.answer!r}, tunelab {self.expected!r}"
        stop = (
            "stopped at the end-of-turn token" if self.stopped_at_end_of_turn else "hit the limit"
        )
        return f"llama.cpp: {verdict}; {stop}; perplexity {self.perplexity:.3f} on held-out text"


def load_llama_cpp(gguf_file: str | Path, context: int = 512) -> Any:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise TunelabError(
            "checking a GGUF file in llama.cpp needs llama-cpp-python: pip install "
            "'tunelab[gguf]' (it compiles llama.cpp: tens of minutes on 2 cores)."
        ) from None
    return Llama(str(gguf_file), n_ctx=context, logits_all=True, verbose=False, seed=0)


def greedy_answer(llm: Any, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """llama.cpp's greedy continuation of ``prompt_ids`` and whether it ended at an
    end-of-generation token (EOS or EOT) rather than at ``max_new_tokens``."""
    llm.reset()
    out: list[int] = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        if (
            llm._model.token_is_eog(token)
            if hasattr(llm._model, "token_is_eog")
            else (token == llm.token_eos())
        ):
            return out, True
        out.append(token)
        if len(out) >= max_new_tokens:
            return out, False
    return out, False


def perplexity(llm: Any, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ``ids[1:]`` given the tokens before each."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    targets = np.asarray(ids[1:])
    return float(math.exp(-log_probs[np.arange(len(targets)), targets].mean()))


def held_out_perplexity(
    gguf_file: str | Path, source: str | Path, held_out: str = HELD_OUT
) -> float:
    """llama.cpp's perplexity of ``gguf_file`` on ``held_out``, tokenized by ``source``'s
    tokenizer (as ``check_in_llama_cpp`` does), to set beside another type's."""
    from tunelab.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(str(source)))
    return perplexity(load_llama_cpp(gguf_file), tokenizer(held_out).input_ids)


def check_in_llama_cpp(
    gguf_file: str | Path,
    source: str | Path | None = None,
    prompt: str = CHECK_PROMPT,
    max_new_tokens: int = 24,
    held_out: str = HELD_OUT,
) -> LlamaCppCheck:
    """Run ``gguf_file`` in llama.cpp. With ``source`` (the run or model folder it came from)
    the prompt is rendered by tunelab exactly as ``tunelab generate`` renders it, and both greedy
    answers are compared; the tokens are tunelab's, so only the weights and the runtime differ."""
    from tunelab.data.tokenize import render_prompt
    from tunelab.generation import generate, load_for_inference

    llm = load_llama_cpp(gguf_file)
    expected = None
    if source is not None:
        loaded = load_for_inference(str(source))
        expected = generate(loaded, [prompt], max_new_tokens=max_new_tokens)[0]
        tokenizer = loaded.tokenizer
        text = render_prompt(tokenizer, prompt, loaded.chat, loaded.system_prompt)
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        held_ids = tokenizer(held_out).input_ids
    else:
        prompt_ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        held_ids = llm.tokenize(held_out.encode(), add_bos=True)
    answer_ids, stopped = greedy_answer(llm, prompt_ids, max_new_tokens)
    answer = llm.detokenize(answer_ids).decode("utf-8", errors="replace").strip()
    if source is not None:
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
    return LlamaCppCheck(
        answer, expected, stopped, perplexity(llm, held_ids), list(prompt_ids), answer_ids
    )
