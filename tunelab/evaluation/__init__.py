"""Evaluation: did fine-tuning help, and would prompting or retrieval have done as well?

``evaluate_run(run_dir, eval_path)`` compares base, few-shot, RAG, tuned and tuned+RAG on the
same held-out examples and writes an HTML + Markdown report with confidence intervals.
"""

from tunelab.evaluation.run import EvalResults, evaluate_run

__all__ = ["EvalResults", "evaluate_run"]
