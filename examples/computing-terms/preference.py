"""The computing-terms demo, second stage: DPO against the model's own hallucinations.

Run from the repo root after (or instead of) run.py:

    python examples/computing-terms/preference.py

1. SFT: the run of config.yaml (reused when outputs/computing-terms holds a finished one);
2. the SFT adapter is merged into the base, which becomes the DPO run's base and reference;
3. ``tunelab data pairs``: FOLDOC's definition is chosen, the SFT model's own sampled answer
   is rejected, for --pairs training terms and --heldout held-out terms;
4. DPO (preference.yaml) on those pairs;
5. ``tunelab eval``'s path (evaluate_run) on the DPO run, systems base (the DPO run's base:
   the merged SFT model) and tuned (DPO): the answer metrics of the held-out terms, the
   held-out pairs' preference accuracy and margin, the verdict and report, and a few answers
   side by side.

It is a second example with its own timing (the SFT stage is run.py's ten minutes; pairs, DPO
and the two-system evaluation add to it), not yet measured on an idle machine: a run on the
shared 2-core machine (2026-11-30) was stopped in its SFT stage, too slow there to mean
anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import time
from pathlib import Path

from tunelab import FineTuner
from tunelab.config import load_config
from tunelab.evaluation.preference import format_preference_table
from tunelab.evaluation.run import evaluate_run
from tunelab.library_noise import silence_library_noise
from tunelab.preference_pairs import make_pairs
from tunelab.shipping.merge import merge_run

HERE = Path(__file__).resolve().parent


def main() -> int:
    silence_library_noise()  # as the tunelab command does: third-party notices stay out
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=96, help="Training terms to pair.")
    parser.add_argument("--heldout", type=int, default=32, help="Held-out terms to pair.")
    parser.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Overrides for the DPO stage (preference.yaml).")  # fmt: skip
    parser.add_argument("--terms", type=int, default=3, help="Held-out answers to show.")
    args = parser.parse_args()
    started = time.time()

    sft_config = load_config(HERE / "config.yaml", args.sft_set)
    sft_run = Path(sft_config.output_dir)
    if not (sft_run / "results.json").is_file() or args.sft_set:
        print("== 1. SFT (config.yaml)")
        FineTuner(sft_config).train(overwrite=True)
    else:
        print(f"== 1. SFT: reusing {sft_run}")
    dpo_config = load_config(HERE / "preference.yaml", args.set)
    merged = Path(dpo_config.model_name)
    print(f"== 2. merging the SFT adapter into {merged}")
    merge_run(sft_run, merged, overwrite=True)

    print("== 3. pairs: FOLDOC's definition chosen, the SFT model's own answer rejected")
    for source, out, count in (
        (sft_config.dataset_path, Path(dpo_config.dataset_path), args.pairs),
        (sft_config.eval_path, Path(dpo_config.eval_path or ""), args.heldout),
    ):
        data = dataclasses.replace(sft_config, dataset_path=source)
        counts = make_pairs(data, str(sft_run), out, max_new_tokens=64, limit=count)
        print(f"   {out.name}: {counts['written']} new pairs, {counts['skipped']} skipped")

    print("== 4. DPO (preference.yaml)")
    results = FineTuner(dpo_config).train(overwrite=True)
    print(f"   {results['steps']} steps, held-out reward accuracy "
          f"{results.get('eval_rewards/accuracies', float('nan')):.1%}")  # fmt: skip

    print("== 5. tunelab eval: answers and held-out pairs, SFT model (the DPO run's base) vs DPO")
    # the tunelab eval path with a short system list: no few-shot/RAG, probes or forgetting
    # check, so it stays a few minutes; "base" is the DPO run's base, the merged SFT model
    report = evaluate_run(
        dpo_config.output_dir, systems=("base", "tuned"), limit=args.heldout, max_new_tokens=48,
        repetition_penalty=1.2, probes=(), forgetting=False,
    )  # fmt: skip
    names = {"base": "sft", "tuned": "dpo"}
    metric = "semantic" if report.settings.get("semantic_model") else "token_f1"
    print(f"\n| system | held-out {metric} | reference loss |\n|---|---|---|")
    for name, summary in report.summary.items():
        score, loss = summary[metric], summary["loss"]
        print(f"| {names[name]} | {score.mean:.1%} [{score.low:.1%}, {score.high:.1%}] "
              f"| {loss.mean:.3f} [{loss.low:.3f}, {loss.high:.3f}] |")  # fmt: skip
    if report.preference is not None:
        table = format_preference_table(report.preference)
        print("\n" + table.replace("| base |", "| sft |").replace("| tuned |", "| dpo |"))
    for line in report.verdict:
        print("-", line)
    print("Report:", report.files.get("html", dpo_config.output_dir))
    sft_answers, dpo_answers = (report.systems[name].answers for name in ("base", "tuned"))
    for i, item in enumerate(report.items[: args.terms]):
        print(f"\n{item.question}\n  FOLDOC: {textwrap.shorten(item.reference, 150)}")
        print(f"  SFT:    {textwrap.shorten(sft_answers[i], 150)}")
        print(f"  DPO:    {textwrap.shorten(dpo_answers[i], 150)}")
    print(f"\nDone in {(time.time() - started) / 60:.1f} minutes.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
