"""The whole ``tunelab eval`` against an earlier commit's, in one run on one machine.

    python benchmarks/eval_speed.py [RUN_DIR] [--questions 200] [--baseline dd954f2]
        [--max-new-tokens 64] [--precision fp32] [--threads N]

Checks out ``--baseline`` into a temporary ``git worktree``, then runs that code's
``evaluate_run`` and this tree's in turn, each in its own Python process on the same run folder
(default: the computing-terms demo's, ``outputs/computing-terms``), the five systems on the
first ``--questions`` held-out items, no forgetting check, each with its own default batch size.
This tree runs held-out items only (no knowledge probes, no semantic metric, no judge), so both
do the same work. It prints both wall times, their ratio, and whether the greedy answers are
identical and the reference losses equal (they should be, in fp32). The machine may be shared:
run it on an idle one and read the ratio. ``--questions 4`` is a quick check. ``--threads 1``
gives both evals one torch thread: on a machine shared with other work, torch's threads wait for
each other by spinning, so every thread after the first adds CPU seconds and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run inside each tree's process: evaluate, then print the wall and CPU seconds it took. CPU time
# counts all threads together, spin-waiting included: on a machine shared with other work two
# torch threads made the same decode cost 18x the CPU seconds of one, so compare with --threads 1
CHILD = """
import json, sys, time
import torch
from tunelab.evaluation.run import evaluate_run
options = json.loads(sys.argv[1])
threads = options.pop("threads")
if threads:
    torch.set_num_threads(threads)
started, cpu = time.perf_counter(), time.process_time()
evaluate_run(progress=lambda line: None, **options)
print("CPU", time.process_time() - cpu)
print("SECONDS", time.perf_counter() - started)
"""


def run_tree(tree: Path, options: dict, log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``evaluate_run`` in ``tree``'s code."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(options)],
            cwd=tree, env=env, stdout=subprocess.PIPE, stderr=out, text=True, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        sys.exit(
            f"{tree}: evaluate_run failed (exit {done.returncode}):\n{log.read_text()[-3000:]}"
        )
    cpu, wall = done.stdout.split("CPU")[-1].split("SECONDS")
    return float(wall), float(cpu)


def baseline_copy(run_dir: Path, folder: Path, baseline: Path) -> Path:
    """The run folder as the baseline can read it: config keys added since are left out of its
    tunelab_config.yaml (a note is printed for any not at its default, since the baseline then
    runs without that setting)."""
    import dataclasses
    import shutil

    import yaml

    from tunelab.config import FIELDS

    known = json.loads(
        subprocess.run(
            [sys.executable, "-c", "import json; from tunelab.config import FIELDS; "
             "print(json.dumps(list(FIELDS)))"],
            cwd=baseline, env={**os.environ, "PYTHONPATH": str(baseline)},
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    shutil.copytree(run_dir, folder)
    config_path = folder / "tunelab_config.yaml"
    values = yaml.safe_load(config_path.read_text())
    for key in [k for k in values if k not in known]:
        spec = FIELDS.get(key)
        default = (
            spec.default_factory() if spec and spec.default_factory is not dataclasses.MISSING
            else getattr(spec, "default", None)
        )  # fmt: skip
        if values[key] != default:
            print(f"note: {key}={values[key]!r} is unknown to the baseline and left out there")
        values.pop(key)
    config_path.write_text(yaml.safe_dump(values, sort_keys=False))
    return folder


def compare(old: dict, new: dict) -> dict:
    """Answers identical item by item, and each system's mean reference loss."""
    same = total = 0
    for old_item, new_item in zip(old["items"], new["items"], strict=True):
        for system, answer in old_item["answers"].items():
            total += 1
            same += new_item["answers"].get(system) == answer
    losses = {
        name: (old["systems"][name]["loss"]["mean"], new["systems"][name]["loss"]["mean"])
        for name in old["systems"]
    }
    return {"identical_answers": f"{same}/{total}", "losses_old_new": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", nargs="?", default=str(ROOT / "outputs" / "computing-terms"))
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--baseline", default="dd954f2", help="Commit to compare against.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"))
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads of each eval (0: torch's default)."
    )
    args = parser.parse_args()
    run_dir = Path(args.run_dir).resolve()
    if not (run_dir / "adapter_config.json").is_file():
        sys.exit(f"{run_dir} holds no finished run: run examples/computing-terms/run.py first.")
    with tempfile.TemporaryDirectory(prefix="tunelab-eval-speed-") as scratch:
        baseline = Path(scratch) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline],
            check=True, capture_output=True,
        )  # fmt: skip
        try:
            common = {
                "run_dir": str(run_dir), "limit": args.questions, "forgetting": False,
                "max_new_tokens": args.max_new_tokens, "precision": args.precision,
                "threads": args.threads,
            }  # fmt: skip
            figures = {}
            old_run = str(baseline_copy(run_dir, Path(scratch) / "baseline-run", baseline))
            for name, tree, extra in (
                ("baseline", baseline, {"run_dir": old_run}),
                ("current", ROOT, {"probes": "none", "semantic": False}),
            ):
                out = Path(scratch) / f"{name}-report"
                started = time.perf_counter()
                seconds, cpu_seconds = run_tree(
                    tree, {**common, **extra, "out_dir": str(out)}, out.with_suffix(".log")
                )
                whole = time.perf_counter() - started
                figures[name] = {
                    "eval_seconds": round(seconds, 1),
                    "eval_cpu_seconds": round(cpu_seconds, 1),
                    "process_seconds": round(whole, 1),
                }
                print(name, figures[name], flush=True)
            old = json.loads((Path(scratch) / "baseline-report" / "eval_results.json").read_text())
            new = json.loads((Path(scratch) / "current-report" / "eval_results.json").read_text())
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)],
                check=False, capture_output=True,
            )  # fmt: skip
    speedup = figures["baseline"]["eval_seconds"] / figures["current"]["eval_seconds"]
    cpu_speedup = figures["baseline"]["eval_cpu_seconds"] / figures["current"]["eval_cpu_seconds"]
    result = {"questions": args.questions, "systems": 5, "baseline": args.baseline,
              "threads": args.threads or "torch default", **figures,
              "speedup": round(speedup, 2), "cpu_speedup": round(cpu_speedup, 2),
              **compare(old, new)}  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
