"""Generation speed of ``tunelab eval``: batched vs one at a time, bf16 vs fp32, in one run.

    python benchmarks/eval_speed.py [RUN_DIR] [--questions 16] [--max-new-tokens 32]

The machine is shared, so read the ratios (measured back to back in one process), not the
absolute figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tunelab.device import cpu_bf16_features
from tunelab.evaluation.run import load_items, resolve_run_dir
from tunelab.evaluation.scoring import timed_generation
from tunelab.evaluation.systems import PromptBuilder
from tunelab.generation import load_for_inference

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", nargs="?", default=str(ROOT / "outputs" / "computing-terms"))
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    folder, config = resolve_run_dir(args.run_dir)
    items, _ = load_items(config, config.eval_path, args.questions)
    figures = {}
    precisions = ["fp32"] + (["bf16"] if cpu_bf16_features() else [])
    for precision in precisions:
        loaded = load_for_inference(str(folder), precision=precision)
        builder = PromptBuilder(loaded.tokenizer, loaded.chat, loaded.system_prompt, [], None)
        prompts = [builder.render("tuned", item, i)[0] for i, item in enumerate(items)]
        for batch_size in (1, 8):
            started = time.perf_counter()
            generated = timed_generation(loaded, prompts, args.max_new_tokens, batch_size)
            figures[f"{precision}_batch{batch_size}"] = {
                "seconds": round(time.perf_counter() - started, 2),
                "tokens_per_second": round(generated.tokens_per_second, 1),
            }
            print(precision, batch_size, figures[f"{precision}_batch{batch_size}"], flush=True)
    base = figures["fp32_batch1"]["tokens_per_second"]
    for value in figures.values():
        value["speed_vs_fp32_batch1"] = round(value["tokens_per_second"] / base, 2)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
