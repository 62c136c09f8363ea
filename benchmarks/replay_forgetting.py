"""What replaying general prose buys: runs trained with and without ``replay_general_share``.

    python benchmarks/replay_forgetting.py RUN [RUN ...] [--precision fp32]

For each run folder, the general-text perplexity of the base model and of the tuned one on the
same passages: those a replay run never trains on (every other passage of the shipped text;
``tunelab eval`` reads only these for a replay run, all of them otherwise, so the two runs'
own reports are not on the same text). Then, where the run folder holds ``tunelab eval``'s
``eval_results.json``, each system's headline score and reference loss on every probe kind,
with the 95% intervals, so the runs' knowledge probes read side by side. Typical use, the
computing-terms demo::

    python examples/computing-terms/run.py
    tunelab train examples/computing-terms/config.yaml --set replay_general_share=0.1 \\
        --set output_dir=$PWD/outputs/computing-terms-replay
    tunelab eval outputs/computing-terms-replay --limit 10 --probes reworded,verbatim \\
        --probe-items 10 --max-new-tokens 48 --repetition-penalty 1.2   # as the demo evaluates
    python benchmarks/replay_forgetting.py outputs/computing-terms outputs/computing-terms-replay
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def forgetting(run: str, precision: str) -> dict[str, dict[str, float]]:
    """Base and tuned perplexity of ``run`` on the never-replayed passages."""
    from tunelab.evaluation.forgetting import general_passages, general_perplexity
    from tunelab.evaluation.run import _adapter
    from tunelab.generation import load_for_inference
    from tunelab.run_folder import read_saved_config

    loaded = load_for_inference(run, precision=precision)
    passages = general_passages()[1::2]  # as data/mixing.replay_passages leaves them out
    figures = {}
    for name in ("base", "tuned"):
        with _adapter(loaded.model, name == "tuned"):
            result = general_perplexity(loaded.model, loaded.tokenizer, passages)
        figures[name] = {k: round(v, 4) for k, v in result.items()}
    share = read_saved_config(run).get("replay_general_share", 0.0)
    return {"replay_general_share": share, **figures}


def probe_table(run: str) -> list[str]:
    """Lines of the run's eval_results.json: system x probe kind, headline and loss."""
    path = Path(run) / "eval_results.json"
    if not path.is_file():
        return [f"  (no {path}: run tunelab eval on it for the probe table)"]
    from tunelab.evaluation.probe_report import probes_text

    return ["  " + line for line in probes_text(json.loads(path.read_text()))]


def main() -> None:
    from tunelab.library_noise import silence_library_noise

    silence_library_noise()  # as the tunelab command does: third-party notices stay out
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    args = parser.parse_args()
    print("general-text perplexity on the passages no replay run trains on (base -> tuned):")
    for run in args.runs:
        figures = forgetting(run, args.precision)
        base, tuned = figures["base"]["perplexity"], figures["tuned"]["perplexity"]
        print(
            f"  {run}: replay_general_share {figures['replay_general_share']}: "
            f"{base:.3f} -> {tuned:.3f} ({100 * (tuned / base - 1):+.1f}%, "
            f"{figures['base']['tokens']} tokens)",
            flush=True,
        )
    for run in args.runs:
        print(f"\nknowledge probes of {run} (tunelab eval's eval_results.json):")
        print("\n".join(probe_table(run)))


if __name__ == "__main__":
    main()
