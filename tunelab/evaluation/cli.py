"""``tunelab eval``: compare base, few-shot, RAG and tuned on held-out data, write the report."""

from __future__ import annotations

import argparse

from tunelab.evaluation.systems import FEW_SHOT_CHOICES, SYSTEMS


def cmd_eval(args: argparse.Namespace) -> int:
    if args.lm_eval:
        from tunelab.evaluation.lm_eval_adapter import run_lm_eval

        return run_lm_eval(args.target, args.lm_eval, limit=args.limit, out=args.out)
    from tunelab.evaluation.preference import (
        evaluate_preference_run,
        format_preference_table,
        is_preference_run,
    )
    from tunelab.evaluation.run import evaluate_run, resolve_run_dir

    if is_preference_run(resolve_run_dir(args.target)[0]):
        report = evaluate_preference_run(
            args.target, args.eval_path, args.sft_run, args.limit, args.batch_size,
            args.precision, args.out,
        )  # fmt: skip
        print(format_preference_table(report))
        return 0
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
    )
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
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
        help="auto: bf16 where the CPU/GPU runs it natively, else fp32.",
    )  # fmt: skip
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.0,
        help=">1 discourages the loops small models fall into under greedy decoding.",
    )  # fmt: skip
    parser.add_argument(
        "--no-forgetting", action="store_true", help="Skip the general-text perplexity check."
    )
    parser.add_argument("--out", help="Folder for the report (default: the run folder).")
    parser.add_argument(
        "--sft-run", metavar="RUN",
        help="Preference runs: also score this SFT run folder on the held-out pairs.",
    )  # fmt: skip
    parser.add_argument(
        "--lm-eval", metavar="TASKS",
        help="Run EleutherAI lm-eval TASKS (comma-separated) on the run instead (optional extra).",
    )  # fmt: skip
    parser.set_defaults(func=cmd_eval)
