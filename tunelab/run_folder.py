"""The run folder: the names of the files ``tunelab train`` (and evaluate) write into a run's
output_dir, and the one reader of each, so that every command reads a damaged file the same way.

A run folder holds::

    tunelab_config.yaml   the config the run trained with (written first)
    metrics.jsonl         one JSON object per logged step or evaluation
    results.json          the final numbers (written last: its presence means "finished")
    run_info.json         what generate/serve need (chat template use, system prompt, base)
    data_manifest.json    what the data pipeline did
    training_curves.png   the curves of metrics.jsonl
    checkpoints/          resumable states
    stop_request.json     "save and stop at the next step" (tunelab ui's Stop on a CLI run);
                          removed when honoured and when the run ends
    eval_report.html|md, eval_results.json   written by ``tunelab evaluate``
    eval_preference.json|md   a preference run's held-out pairs table, by ``tunelab eval``

The readers' rule for metrics.jsonl (appended line by line while training runs): a cut-off LAST
line is what a crash or a full disk mid-write leaves, so it is skipped with a logged warning
naming the file and line; any other line that is not a JSON object was edited or damaged, and
raises TunelabError naming ``file:line``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.files import read_json_file

CONFIG = "tunelab_config.yaml"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
RUN_INFO = "run_info.json"
DATA_MANIFEST = "data_manifest.json"
CURVES = "training_curves.png"
CHECKPOINTS = "checkpoints"
STOP_REQUEST = "stop_request.json"
ADAPTER_CONFIG = "adapter_config.json"
EVAL_REPORT_HTML = "eval_report.html"
EVAL_REPORT_MD = "eval_report.md"
EVAL_RESULTS = "eval_results.json"
EVAL_REPORT_FILES = (EVAL_REPORT_HTML, EVAL_REPORT_MD, EVAL_RESULTS)
EVAL_PREFERENCE_FILES = ("eval_preference.json", "eval_preference.md")

logger = logging.getLogger(__name__)
_TORN = object()  # a line that does not parse at all

# the kinds of the values the readers' callers use (tables, curves, doctor): a value of
# another kind was edited in, and is refused by name rather than shown or plotted
_WHOLE = ("step", "steps", "train_tokens", "train_loss_tokens", "skipped_steps", "tokens",
          "stopped_early_at_step", "trainable_parameters", "total_parameters",
          "train_examples", "vocab_size")  # fmt: skip
_NUMBERS = ("loss", "lr", "grad_norm", "epoch", "epochs", "tokens_per_second",
            "train_runtime_seconds", "final_train_loss", "peak_memory_mb",
            "reference_seconds")  # fmt: skip
_NUMBER_PREFIXES = ("eval_", "initial_eval_", "best_eval_")
_TEXT = ("method", "precision", "device")


def value_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be the value of ``key`` in a metrics line or results.json (None
    when it can, or when the key is not one the readers check): e.g. "expected a whole
    number (an integer), found 'eight'". None (JSON null) stands for "no number"."""
    if value is None:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in _WHOLE:
        if not number or not float(value).is_integer():
            return f"expected a whole number, found {value!r}"
        if value < 0:
            return f"expected a number of 0 or more, found {value!r}"
    elif key in _NUMBERS or key.startswith(_NUMBER_PREFIXES):
        if not number:
            return f"expected a number, found {value!r}"
    elif key in _TEXT and not isinstance(value, str):
        return f"expected text, found {value!r}"
    return None


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def results_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RESULTS


def run_info_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RUN_INFO


def checkpoints_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def damaged_run_fix(folder: str | Path, doctor: bool = True) -> str:
    """What to do about a run folder whose files were cut off (a full disk, a crash);
    ``doctor=False`` leaves out the advice to run doctor (for doctor's own findings)."""
    if not metrics_path(folder).is_file():  # a merged or downloaded model
        return (
            "The model folder is incomplete (cut off while being written or copied): write it "
            "again (tunelab merge, or copy it again from where it came from)."
        )
    return (
        "The run's save did not complete (a full disk or a crash while saving). Free some "
        "space, then train again with --resume (from its last checkpoint) or --overwrite"
        + (f"; 'tunelab doctor {folder}' shows what the run got to." if doctor else ".")
    )


def parse_metrics_file(path: str | Path, damaged: list[str] | None = None) -> list[dict[str, Any]]:
    """The records (JSON objects) of a metrics.jsonl file, in order; blank lines are ignored.

    A cut-off last line is skipped with a warning naming ``path:line``; another line that is
    not a JSON object (or not UTF-8), or whose step, loss or other value is of the wrong kind,
    raises TunelabError naming ``path:line`` -- or, when ``damaged`` is a list (doctor, which
    reports rather than stops), is skipped and its message appended to ``damaged``."""
    path = Path(path)
    # bytes, split by line, decoded one at a time: a write cut inside a multi-byte character
    # tears only the last line
    lines = path.read_bytes().split(b"\n")
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for position, (number, raw) in enumerate(numbered):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = _TORN
        if isinstance(record, dict):
            problems = [
                (k, p) for k, p in ((k, value_problem(k, v)) for k, v in record.items()) if p
            ]
            if not problems:
                records.append(record)
                continue
            key, problem = problems[0]
            message = (
                f"{path}:{number}: {key!r} {problem}, so the line was edited or damaged. "
                "Correct or delete that line, or start the run again with --overwrite."
            )
            if damaged is None:
                raise TunelabError(message)
            damaged.append(message)
            continue
        shown = raw[:60].decode("utf-8", errors="replace")
        if record is _TORN and position == len(numbered) - 1:
            logger.warning(
                "%s:%d is cut off (%r), as a crash or a full disk while it was written leaves "
                "it; the line is skipped.",
                path,
                number,
                shown,
            )
            break
        problem = "is not valid JSON" if record is _TORN else "is not a JSON object"
        message = (
            f"{path}:{number} {problem} ({shown!r}): the file was cut off or edited. Delete "
            "that line, or start the run again with --overwrite."
        )
        if damaged is None:
            raise TunelabError(message)
        damaged.append(message)
    return records


def read_metrics(run_dir: str | Path, damaged: list[str] | None = None) -> list[dict[str, Any]]:
    """Every record of the run's metrics.jsonl ([] when it has none); see
    :func:`parse_metrics_file` for how a damaged line is handled."""
    path = metrics_path(run_dir)
    return parse_metrics_file(path, damaged) if path.is_file() else []


def split_metrics(records: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(training records: those with ``loss``, evaluation records: those with ``eval_loss``)."""
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def read_results(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's results.json (None for a run that has not finished); TunelabError naming the
    file when it is cut off or not a JSON object."""
    path = results_path(run_dir)
    if not path.is_file():
        return None
    fix = damaged_run_fix(run_dir)
    results = read_json_file(path, fix)
    if not isinstance(results, dict):
        raise TunelabError(f"{path} is damaged (not a JSON object). {fix}")
    for key, value in results.items():
        problem = value_problem(key, value)
        if problem:
            raise TunelabError(
                f"{path}: {key!r} {problem}, so the file was edited or damaged. Restore the "
                "value tunelab wrote, or train the run again (--overwrite)."
            )
    return results


def read_saved_config(run_dir: str | Path) -> dict[str, Any]:
    """The mapping in the run's saved tunelab_config.yaml ({} when absent or empty);
    TunelabError (naming the file and line) when it is not valid YAML, not UTF-8, or not a
    mapping."""
    import yaml

    from tunelab.yaml_numbers import load_yaml, yaml_error_line

    path = config_path(run_dir)
    if not path.is_file():
        return {}
    try:
        values = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = yaml_error_line(exc)
        raise TunelabError(
            f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}). "
            "The run's saved config was edited or damaged: restore it from the config you "
            "trained with."
        ) from None
    except UnicodeDecodeError:
        raise TunelabError(
            f"{path}: not UTF-8 text. Restore it from the config you trained with."
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TunelabError(
            f"{path}: expected 'key: value' lines, found a {type(values).__name__}. "
            "Restore it from the config you trained with."
        )
    return values


def read_run_info(folder: str | Path) -> dict[str, Any]:
    """The run_info.json of a run or merged model ({} when absent): chat template use, the
    system prompt, the base model; TunelabError naming the file when it is damaged."""
    path = run_info_path(folder)
    if not path.is_file():
        return {}
    fix = damaged_run_fix(folder)
    info = read_json_file(path, fix)
    if not isinstance(info, dict):
        raise TunelabError(f"{path} is damaged (not a JSON object). {fix}")
    return info
