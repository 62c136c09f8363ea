"""``tunelab doctor``: what this machine can do, and what went wrong in a run.

- ``environment``: versions, CPU/GPU, memory, disk, the model cache, the precision tunelab picks.
- ``findings``: the ``Finding`` record (severity, evidence, fix) and how it is printed.
- ``metrics_checks``: problems visible in metrics.jsonl and results.json alone.
- ``data_checks``: problems found by re-reading the run's data and tokenizer.
- ``run_report``: runs every check on a run folder.
- ``cli_docs``: writes docs/cli.md from the argparse parser.
"""
