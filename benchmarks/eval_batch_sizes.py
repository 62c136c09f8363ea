"""Speed of ``tunelab eval``'s scoring + generation, in one process so the ratios are fair.

    python benchmarks/eval_batch_sizes.py [RUN_DIR] [--questions 16] [--max-new-tokens 64]
        [--system rag] [--batch-sizes 8,16,32] [--precisions fp32,bf16] [--apart]

For each precision and batch size it times the shared pass (one forward over prompt +
reference gives the loss and the prompt's KV cache, then greedy decoding) and, with
``--apart``, the former way (a loss pass, then ``generate`` over the prompts again). The machine
is shared, so read the ratios (measured back to back), not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tunelab.device import cpu_bf16_features
from tunelab.evaluation.retrieval import build_retriever
from tunelab.evaluation.run import load_items
from tunelab.evaluation.scoring import reference_losses, timed_generation
from tunelab.evaluation.shared_pass import score_and_generate
from tunelab.evaluation.systems import PromptBuilder, document
from tunelab.generation import load_for_inference
from tunelab.runs.checks import resolve_run_dir

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", nargs="?", default=str(ROOT / "outputs" / "computing-terms"))
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--system", default="rag", help="Whose prompts (rag's are the longest).")
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--precisions", default="fp32,bf16" if cpu_bf16_features() else "fp32")
    parser.add_argument("--apart", action="store_true", help="Also time loss pass + generate.")
    args = parser.parse_args()
    folder, config = resolve_run_dir(args.run_dir)
    items, pool = load_items(config, config.eval_path, args.questions)
    index = build_retriever("bm25", [document(p) for p in pool])
    figures: dict[str, dict[str, float]] = {}
    for precision in args.precisions.split(","):
        loaded = load_for_inference(str(folder), precision=precision)
        builder = PromptBuilder(loaded.tokenizer, loaded.chat, loaded.system_prompt, pool, index, 3)
        rendered = [builder.render(args.system, item, i) for i, item in enumerate(items)]
        prompts, fulls = [p for p, _ in rendered], [f for _, f in rendered]
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            ways = ("shared", "apart") if args.apart else ("shared",)
            for way in ways:
                started = time.perf_counter()
                if way == "shared":
                    losses, generated, _ = score_and_generate(
                        loaded, prompts, fulls, args.max_new_tokens, batch_size
                    )
                else:
                    losses = reference_losses(loaded.model, loaded.tokenizer, prompts, fulls)
                    generated = timed_generation(loaded, prompts, args.max_new_tokens, batch_size)
                seconds = time.perf_counter() - started
                nll, tokens = sum(x.nll_sum for x in losses), sum(x.tokens for x in losses)
                key = f"{precision}_batch{batch_size}_{way}"
                figures[key] = {
                    "seconds": round(seconds, 2),
                    "seconds_per_question": round(seconds / len(prompts), 3),
                    "tokens_per_second": round(generated.tokens_per_second, 1),
                    "loss": round(nll / max(tokens, 1), 5),
                }
                print(key, figures[key], flush=True)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
