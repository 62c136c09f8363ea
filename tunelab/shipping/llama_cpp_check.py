"""Prove an exported GGUF file in llama.cpp itself (through llama-cpp-python): it loads, its
greedy answer to a fixed chat prompt equals ``tunelab generate``'s, it stops at the trained
end-of-turn token, and its perplexity on held-out text is measured.

When the answers differ, the first token where they part is looked at under tunelab's own
logits: if tunelab's choice led llama.cpp's by less than ``NEAR_TIE_GAP`` logits, rounded
weights (q8_0, f16) can honestly flip it and the verdict says "differs at a near-tie"; a larger
lead is a real mismatch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

CHECK_PROMPT = "What does a compiler do?"
# Largest lead (in logits) of tunelab's greedy token over llama.cpp's that a rounding of the
# weights can plausibly overturn; a lead above it is reported as a real mismatch.
NEAR_TIE_GAP = 0.1
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
    parting: Parting | None = None  # where the answers part, when they differ

    @property
    def matches(self) -> bool | None:
        return None if self.expected is None else self.answer == self.expected

    @property
    def near_tie(self) -> bool:
        """The answers differ only from a token that tunelab's logits nearly tie."""
        return bool(not self.matches and self.parting and self.parting.gap < NEAR_TIE_GAP)

    def summary(self) -> str:
        both = f"llama.cpp {self.answer!r}, tunelab {self.expected!r}"
        if self.matches is None:
            verdict = "loaded"
        elif self.matches:
            verdict = "greedy answer equals tunelab generate's"
        elif self.parting is None:
            verdict = f"greedy answer DIFFERS: {both}"
        elif self.near_tie:
            verdict = f"greedy answer differs at a near-tie ({self.parting.describe()}): {both}"
        else:
            verdict = f"greedy answer DIFFERS ({self.parting.describe()}): {both}"
        stop = (
            "stopped at the end-of-turn token" if self.stopped_at_end_of_turn else "hit the limit"
        )
        return f"llama.cpp: {verdict}; {stop}; perplexity {self.perplexity:.3f} on held-out text"


@dataclass
class Parting:
    """The first new token where llama.cpp's greedy answer leaves tunelab's."""

    index: int  # 0-based, among the new tokens
    tunelab_token: str
    llama_cpp_token: str
    gap: float  # tunelab's logit of its own choice minus its logit of llama.cpp's, >= 0

    def describe(self) -> str:
        return (
            f"new token {self.index + 1}: tunelab {self.tunelab_token!r}, llama.cpp "
            f"{self.llama_cpp_token!r}; tunelab's logits differ by {self.gap:.3f}"
        )


def find_parting(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    answer_ids: list[int],
    stopped: bool,
    end_id: int | None,
) -> Parting | None:
    """Teacher-force llama.cpp's answer (``answer_ids``, ended by ``end_id`` when ``stopped``)
    through tunelab's ``model`` and return the first position where tunelab's greedy choice is
    another token, with the gap between the two logits there; None when every token agrees."""
    import torch

    chosen = answer_ids + ([end_id] if stopped and end_id is not None else [])
    if not chosen:
        return None
    ids = torch.tensor([prompt_ids + chosen])
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device)).logits[0, len(prompt_ids) - 1 : -1].float()
    for index, token in enumerate(chosen):
        own = int(logits[index].argmax())
        if own != token:
            gap = float(logits[index, own] - logits[index, token])
            return Parting(index, tokenizer.decode([own]), tokenizer.decode([token]), gap)
    return None


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
    from tunelab.generation import is_run_dir
    from tunelab.models import load_tokenizer, resolve_model, run_trust_remote_code

    # a run folder holds its own tokenizer (the one check_in_llama_cpp uses), not a model
    location = str(source) if is_run_dir(source) else resolve_model(str(source))
    tokenizer = load_tokenizer(location, run_trust_remote_code(location))
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
    parting = None
    if source is not None:
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        if answer != expected:
            end_id = tokenizer.eos_token_id
            parting = find_parting(
                loaded.model, tokenizer, list(prompt_ids), answer_ids, stopped, end_id
            )
    return LlamaCppCheck(
        answer, expected, stopped, perplexity(llm, held_ids), list(prompt_ids), answer_ids, parting
    )
