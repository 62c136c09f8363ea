"""Exported files run in llama.cpp itself (llama-cpp-python): greedy answers equal tunelab
generate's, k-quants come from llama.cpp's quantizer, perplexity is printed beside f16's."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.cli import main
from tunelab.shipping.gguf_export import export_gguf

pytest.importorskip("llama_cpp")

from test_gguf_families import build_family_model  # noqa: E402

from tunelab.shipping.llama_cpp_check import HELD_OUT, check_in_llama_cpp  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_greedy_answer_in_llama_cpp_equals_tunelab_generate(family, tiny_model_dir, tmp_path):
    source = (
        tiny_model_dir
        if family == "llama"
        # not named after the family: llama.cpp gives a file whose name contains "phi3" the
        # Phi-3 tokenizer's special-token rules, which expect its </s> token
        else build_family_model(family, tiny_model_dir, tmp_path / "tiny")
    )
    result = check_in_llama_cpp(export_gguf(source, tmp_path / "m.gguf", "f16"), source)
    assert result.expected is not None and result.answer == result.expected, result.summary()
    assert result.perplexity > 1
    # token for token too (answers of random models can be mostly whitespace as text)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokens = len(result.answer_ids) + int(result.stopped_at_end_of_turn)
    with torch.no_grad():
        ids = model.generate(
            torch.tensor([result.prompt_ids]), max_new_tokens=tokens, do_sample=False
        )[0, len(result.prompt_ids) :].tolist()
    assert ids[: len(result.answer_ids)] == result.answer_ids
    # random models' answers can be one token over and over, so the whole distribution is
    # compared too: llama.cpp's perplexity on the held-out text is transformers' (f16 weights)
    held = AutoTokenizer.from_pretrained(source)(HELD_OUT, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(held, labels=held).loss
    assert result.perplexity == pytest.approx(float(torch.exp(loss)), rel=0.01)


def test_tiny_model_stops_at_the_end_of_turn_in_llama_cpp(tiny_model_dir, tmp_path):
    # the shared tiny model answers with new lines and then its EOS <|im_end|> ... or not: the
    # check reports which; its answer must match tunelab's either way
    result = check_in_llama_cpp(
        export_gguf(tiny_model_dir, tmp_path / "m.gguf", "f16"), tiny_model_dir, max_new_tokens=8
    )
    assert result.matches


def test_export_quantizes_with_llama_cpp_and_reports_the_check(tiny_model_dir, tmp_path, capsys):
    import gguf

    out = tmp_path / "q.gguf"
    assert main(["export", str(tiny_model_dir), "--type", "q4_k_m", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "llama.cpp:" in printed and "perplexity" in printed
    beside = re.search(r"Held-out perplexity: q4_k_m ([\d.]+), f16 ([\d.]+)", printed)
    assert beside and beside.group(1) != beside.group(2), printed
    kinds = {t.tensor_type for t in gguf.GGUFReader(out).tensors}
    # rows of 64 are too short for q4_K blocks (256): llama.cpp falls back to its own q5_0/q8_0
    assert kinds & {gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.Q4_K}
    f16 = check_in_llama_cpp(export_gguf(tiny_model_dir, tmp_path / "f.gguf", "f16"), None)
    quantized = check_in_llama_cpp(out, None)
    print(f"perplexity f16 {f16.perplexity:.3f}, q4_k_m {quantized.perplexity:.3f}")
    assert quantized.perplexity != f16.perplexity


def test_a_difference_is_a_near_tie_only_where_tunelabs_logits_nearly_tie(tiny_model_dir):
    """A constructed llama.cpp answer that leaves tunelab's greedy one at a chosen token: the
    check finds that token and tunelab's logit gap there, and calls it a near-tie only when the
    gap is below NEAR_TIE_GAP (the runner-up at the closest position), a real mismatch
    otherwise (the least likely token)."""
    from conftest import spread_weights

    from tunelab.shipping.llama_cpp_check import (
        NEAR_TIE_GAP,
        LlamaCppCheck,
        Parting,
        find_parting,
    )

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    spread_weights(model, seed=4, std=0.05)  # its closest top-2 gap: 0.016 logits
    prompt = tokenizer("What does a compiler do?").input_ids
    greedy = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            greedy.append(int(model(torch.tensor([greedy])).logits[0, -1].argmax()))
        logits = model(torch.tensor([greedy])).logits[0, len(prompt) - 1 : -1]
    answer = greedy[len(prompt) :]
    top2 = logits.topk(2, dim=-1)
    gaps = top2.values[:, 0] - top2.values[:, 1]
    closest = int(gaps.argmin())
    spread = float(logits[closest].max() - logits[closest].min())
    assert float(gaps[closest]) < NEAR_TIE_GAP < spread

    def check(token: int) -> LlamaCppCheck:
        constructed = answer[:closest] + [token] + answer[closest + 1 :]
        parting = find_parting(model, tokenizer, prompt, constructed, False, None)
        assert isinstance(parting, Parting) and parting.index == closest
        assert parting.tunelab_token == tokenizer.decode([answer[closest]])
        assert parting.llama_cpp_token == tokenizer.decode([token])
        own = logits[closest, answer[closest]]
        assert parting.gap == pytest.approx(float(own - logits[closest, token]), abs=1e-4)
        return LlamaCppCheck("a", "b", False, 1.0, prompt, constructed, parting)

    near = check(int(top2.indices[closest, 1]))
    assert near.near_tie
    assert f"differs at a near-tie (new token {closest + 1}: " in near.summary()
    far = check(int(logits[closest].argmin()))
    assert not far.near_tie and far.parting and far.parting.gap > NEAR_TIE_GAP
    assert f"greedy answer DIFFERS (new token {closest + 1}: " in far.summary()
    # tunelab's own answer parts nowhere
    assert find_parting(model, tokenizer, prompt, answer, False, None) is None


def test_the_quantizers_per_tensor_lines_become_one_summary(tiny_model_dir, tmp_path, capfd):
    """llama.cpp prints a line per tensor from C (past sys.stdout); the export shows none of
    them, only one line that says how many tensors fell back, to what and why."""
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("tunelab.shipping.gguf_export").addHandler(handler)
    try:
        export_gguf(tiny_model_dir, tmp_path / "q.gguf", "q4_k_m")
    finally:
        logging.getLogger("tunelab.shipping.gguf_export").removeHandler(handler)
    printed = capfd.readouterr()
    assert "falling back" not in printed.out + printed.err
    assert "converting to" not in printed.out + printed.err
    # the tiny model: 14 of its 20 tensors have rows of 64 or 128 values (q4_K/q6_K need 256)
    assert records == [
        "llama.cpp's quantizer: 14 of 20 tensors are not q4_k_m because their rows (64, 128 "
        "values) are not a multiple of 256; it used q5_0 for 12 (instead of q4_K) and q8_0 for "
        "2 (instead of q6_K), so the file is a little larger and more precise."
    ]


@pytest.mark.slow
def test_default_model_in_llama_cpp_answers_like_tunelab_and_stops(tmp_path, capsys):
    from tunelab.models import resolve_model

    source = resolve_model("smollm2-135m-instruct")
    files = {t: export_gguf(source, tmp_path / f"smol-{t}.gguf", t) for t in ("f16", "q8_0")}
    files["q4_k_m"] = export_gguf(source, tmp_path / "smol-q4_k_m.gguf", "q4_k_m")
    # a short answer, to see it end at <|im_end|> as tunelab's does
    short = check_in_llama_cpp(files["f16"], source, "Say hello in one short sentence.", 64)
    assert short.matches and short.stopped_at_end_of_turn, short.summary()
    # q8_0 rounds every weight, so a near-tie can flip a token (measured: "Say hello" flips
    # "chat" to "story" at token 7); on this prompt the 48 tokens agree
    results = {t: check_in_llama_cpp(f, source, max_new_tokens=48) for t, f in files.items()}
    for out_type in ("f16", "q8_0"):
        assert results[out_type].matches, results[out_type].summary()
    with capsys.disabled():
        print(" ".join(f"{t} perplexity {r.perplexity:.2f}" for t, r in results.items()))
    # measured: f16 28.29, q8_0 28.09, q4_k_m 30.74 on HELD_OUT
    assert results["q8_0"].perplexity == pytest.approx(results["f16"].perplexity, rel=0.03)
    assert results["q4_k_m"].perplexity == pytest.approx(results["f16"].perplexity, rel=0.25)


@pytest.mark.slow
def test_export_takes_the_default_models_name(tmp_path, monkeypatch, capsys):
    """Found by the new-user break test: `tunelab export smollm2-135m-instruct` (a name serve
    and generate take) was refused as "not a transformers model folder"; its file goes to the
    current folder, not into the model cache."""
    monkeypatch.chdir(tmp_path)
    assert main(["export", "smollm2-135m-instruct", "--type", "f16", "--no-check"]) == 0
    written = tmp_path / "smollm2-135m-instruct-f16.gguf"
    assert f"Wrote {written} (" in capsys.readouterr().out
    assert written.read_bytes()[:4] == b"GGUF"


def test_a_quantized_export_of_a_run_folder_sets_perplexity_beside_f16(
    make_config, tmp_path, capsys
):
    # The documented first example (`tunelab export outputs/run --type q4_k_m`): the f16
    # perplexity must tokenize with the run folder's tokenizer, which is not a model folder.
    from tunelab.api import FineTuner

    run = tmp_path / "run"
    FineTuner(make_config(max_steps=2, output_dir=str(run))).train()
    out = tmp_path / "run-q8_0.gguf"
    assert main(["export", str(run), "--type", "q8_0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"Held-out perplexity: q8_0 [\d.]+, f16 [\d.]+ \([+-][\d.]+%\)", printed)
