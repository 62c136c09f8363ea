"""Exported files run in llama.cpp itself (llama-cpp-python): greedy answers equal tunelab
generate's, k-quants come from llama.cpp's quantizer, perplexity is printed beside f16's."""

import pytest

from tunelab.cli import main
from tunelab.shipping.gguf_export import export_gguf

pytest.importorskip("llama_cpp")

from test_gguf_families import build_family_model  # noqa: E402

from tunelab.shipping.llama_cpp_check import check_in_llama_cpp  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_greedy_answer_in_llama_cpp_equals_tunelab_generate(family, tiny_model_dir, tmp_path):
    source = (
        tiny_model_dir
        if family == "llama"
        else build_family_model(family, tiny_model_dir, tmp_path / family)
    )
    result = check_in_llama_cpp(export_gguf(source, tmp_path / "m.gguf", "f16"), source)
    assert result.expected is not None and result.answer == result.expected, result.summary()
    assert result.perplexity > 1


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
    kinds = {t.tensor_type for t in gguf.GGUFReader(out).tensors}
    # rows of 64 are too short for q4_K blocks (256): llama.cpp falls back to its own q5_0/q8_0
    assert kinds & {gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.Q4_K}
    f16 = check_in_llama_cpp(export_gguf(tiny_model_dir, tmp_path / "f.gguf", "f16"), None)
    quantized = check_in_llama_cpp(out, None)
    print(f"perplexity f16 {f16.perplexity:.3f}, q4_k_m {quantized.perplexity:.3f}")
    assert quantized.perplexity != f16.perplexity
