"""Generation speed of an exported GGUF file in llama.cpp beside ``tunelab generate``'s.

    python benchmarks/gguf_generation.py [RUN_OR_MODEL] [--types f16,q8_0,q4_k_m]
        [--max-new-tokens 64] [--repeats 3]

Exports the run or model (default: the default model) to each type, then times greedy
generation of the same rendered chat prompt: tunelab generate (transformers, fp32) and
llama.cpp (llama-cpp-python) on each file, printing new tokens per second, the median of
``--repeats`` runs (tunelab's new tokens counted by re-tokenizing its answer), and whether
each answer equals tunelab's. The machine may be shared:
compare the rows, measured back to back.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

PROMPT = "What does a compiler do?"


def main() -> None:
    from tunelab.data.tokenize import render_prompt
    from tunelab.generation import generate_from_text, is_run_dir, load_for_inference
    from tunelab.models import resolve_model
    from tunelab.shipping.gguf_export import export_gguf
    from tunelab.shipping.llama_cpp_check import greedy_answer, load_llama_cpp
    from tunelab.shipping.merge import merge_run

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--types", default="f16,q8_0,q4_k_m")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = load_for_inference(args.target)
    text = render_prompt(loaded.tokenizer, PROMPT, loaded.chat, loaded.system_prompt)
    prompt_ids = loaded.tokenizer(text, add_special_tokens=False).input_ids

    def tunelab_once() -> tuple[float, int, str]:
        began = time.perf_counter()
        answer = generate_from_text(loaded, [text], args.max_new_tokens)[0]
        new = len(loaded.tokenizer(answer, add_special_tokens=False).input_ids)
        return time.perf_counter() - began, new, answer

    rows = []
    runs = [tunelab_once() for _ in range(args.repeats)]
    expected = runs[0][2]
    seconds = statistics.median(r[0] for r in runs)
    rows.append(("tunelab generate (fp32)", runs[0][1] / seconds, True))
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as scratch:
        source = args.target
        if is_run_dir(args.target):
            source = str(merge_run(args.target, Path(scratch) / "merged"))
        else:
            source = resolve_model(args.target)
        for out_type in args.types.split(","):
            gguf_file = export_gguf(source, Path(scratch) / f"m-{out_type}.gguf", out_type)
            llm = load_llama_cpp(gguf_file, context=len(prompt_ids) + args.max_new_tokens + 8)
            timings = []
            for _ in range(args.repeats):
                began = time.perf_counter()
                ids, _ = greedy_answer(llm, prompt_ids, args.max_new_tokens)
                timings.append((time.perf_counter() - began, len(ids)))
            answer = loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
            seconds = statistics.median(t for t, _ in timings)
            rows.append((f"llama.cpp {out_type}", timings[0][1] / seconds, answer == expected))
    print(f"{args.target}: greedy, {args.max_new_tokens} new tokens at most, prompt {PROMPT!r}")
    print(f"{'engine':<26} {'tokens/s':>9}  same answer as tunelab")
    for name, speed, same in rows:
        print(f"{name:<26} {speed:>9.1f}  {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
