"""``tunelab doctor RUN_DIR``: read a run folder and list its problems with evidence and fixes.

A tunelab run folder has metrics.jsonl, results.json, tunelab_config.yaml, run_info.json and the
tokenizer. A folder trained by another tool is read too: transformers' ``trainer_state.json``
stands in for metrics.jsonl, and the tokenizer checks run on its tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from tunelab.diagnostics.data_checks import (
    DataView,
    check_chat_template,
    check_eos_label,
    check_padding,
    check_truncation,
    load_data_view,
    read_json,
)
from tunelab.diagnostics.findings import Finding
from tunelab.diagnostics.metrics_checks import metrics_findings
from tunelab.errors import TunelabError
from tunelab.files import check_safetensors, read_json_file
from tunelab.run_folder import (
    CONFIG,
    DATA_MANIFEST,
    METRICS,
    RESULTS,
    RUN_INFO,
    damaged_run_fix,
    metrics_path,
    read_metrics,
    read_results,
    read_saved_config,
    split_metrics,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def read_run_metrics(
    run_dir: Path, damaged: list[str] | None = None
) -> tuple[list[dict], list[dict]]:
    """Train and eval records from metrics.jsonl, or from a transformers trainer_state.json;
    with a ``damaged`` list, metrics.jsonl's damaged lines are skipped and described there."""
    if metrics_path(run_dir).is_file():
        return split_metrics(read_metrics(run_dir, damaged))
    state = read_json(run_dir / "trainer_state.json")
    if state is None:
        return [], []
    history = state.get("log_history") or []
    train = [
        {"step": r["step"], "loss": r["loss"], "lr": r.get("learning_rate"), **_grad(r)}
        for r in history
        if "loss" in r and "step" in r
    ]
    evals = [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in history if "eval_loss" in r]
    return train, evals


def _grad(record: dict) -> dict:
    return {"grad_norm": record["grad_norm"]} if "grad_norm" in record else {}


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's saved config values ({} when it has none); see ``read_saved_config``."""
    return read_saved_config(run_dir)


def typed_config(values: dict[str, Any]) -> Any:
    """The run's FineTuningConfig; keys this tunelab does not know (older/newer runs) are
    ignored rather than refused, since doctor only reads."""
    from tunelab.config import FineTuningConfig

    known = {f.name for f in dataclasses.fields(FineTuningConfig)}
    return FineTuningConfig(**{k: v for k, v in values.items() if k in known})


def _base_tokenizer(run_dir: Path, info: dict[str, Any]) -> Any | None:
    adapter = read_json(run_dir / "adapter_config.json") or {}
    base = info.get("base_model") or adapter.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        return None
    from tunelab.models import load_saved_tokenizer, run_trust_remote_code

    try:
        return load_saved_tokenizer(base, run_trust_remote_code(run_dir))
    except TunelabError:
        return None  # the base cannot be read here: the checks that need it are skipped


def diagnose_run(run_dir: str | Path) -> list[Finding]:
    """Every finding for a run folder (see ``tunelab doctor --help`` for what is checked)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TunelabError(
            f"{run_dir} is not a folder. Pass a run folder (the output_dir of 'tunelab train'); "
            "'tunelab runs list' shows the runs under outputs/."
        )
    damaged = check_saved_files(run_dir)
    bad_lines: list[str] = []
    train, evals = read_run_metrics(run_dir, bad_lines)
    if bad_lines:  # one finding for the file, the lines it skipped as its evidence
        damaged.append(
            Finding(
                "damaged_file",
                "error",
                f"{METRICS} has {len(bad_lines)} damaged line(s), left out of the checks below",
                "\n".join(bad_lines[:5]) + ("\n..." if len(bad_lines) > 5 else ""),
                "Correct or delete those lines (the others are read), or train the run again "
                "with --overwrite.",
            )
        )
    # a cut-off tokenizer file is reported above, not parsed (and not loaded) below
    has_tokenizer = any((run_dir / name).is_file() for name in TOKENIZER_FILES) and not any(
        f.evidence.startswith(str(run_dir / name)) for f in damaged for name in TOKENIZER_FILES
    )
    config_values = read_run_config(run_dir)
    if not train and not evals and not has_tokenizer and not config_values:
        raise TunelabError(
            f"{run_dir} holds no {METRICS}, trainer_state.json, {CONFIG} or "
            "tokenizer, so it is not a training run. Pass the output_dir of 'tunelab train'."
        )
    results = _results(run_dir, damaged)
    info = read_json(run_dir / RUN_INFO) or {}
    manifest = read_json(run_dir / DATA_MANIFEST) or {}
    trained_by_tunelab = bool(config_values)

    findings: list[Finding] = list(damaged)
    if trained_by_tunelab or train:
        vocab_size = _vocab_size(run_dir, results, config_values)
        findings += metrics_findings(train, evals, results, config_values, vocab_size)
    config = typed_config(config_values) if trained_by_tunelab else None

    view: DataView | None = None
    run_tokenizer = None
    if has_tokenizer:
        from tunelab.models import load_saved_tokenizer, run_trust_remote_code

        try:
            # as saved, pad unchanged
            run_tokenizer = load_saved_tokenizer(str(run_dir), run_trust_remote_code(run_dir))
        except Exception as error:  # any library failure on a user's files: a finding
            findings.append(_unreadable_tokenizer(run_dir, error))
            has_tokenizer = False
    # preference data is not SFT data: read by the SFT data stage it failed with a schema
    # error ("rename the columns"), and the padding and EOS probes are the SFT collator's
    if config is not None and has_tokenizer and config.objective == "sft":
        view, problem = _data_view(run_dir, config)
        if problem is not None:
            findings.append(problem)
    if config is not None:
        findings += check_truncation(results or {}, manifest, view, config.max_length)
        if view is not None and view.tokenized:
            findings += check_padding(view, config)
    if run_tokenizer is not None:
        if info:
            base = _base_tokenizer(run_dir, info)
            findings += check_chat_template(run_tokenizer, info, base, view)
        findings += check_eos_label(run_tokenizer, trained_by_tunelab, view, config)
    return findings


def _results(run_dir: Path, damaged: list[Finding]) -> dict[str, Any] | None:
    """The run's results.json (None: the run did not finish). One that is there but cannot be
    read is {} -- the run finished, its numbers are unknown -- with a finding for a value of
    the wrong kind (a file that is not JSON has its finding from check_saved_files)."""
    if not (run_dir / RESULTS).is_file():
        return None
    try:
        return read_results(run_dir)
    except TunelabError as error:
        if not any(f.evidence.startswith(str(run_dir / RESULTS)) for f in damaged):
            damaged.append(
                Finding(
                    "damaged_file",
                    "error",
                    f"{RESULTS} is damaged",
                    str(error).strip(),
                    "Restore the value tunelab wrote, or train the run again with --overwrite.",
                )
            )
        return {}


def _vocab_size(run_dir: Path, results: Any, config: dict[str, Any]) -> int | None:
    """The model's vocabulary size: results.json, else the base model's config.json (the run's
    or its model_name folder), for the uniform-guess loss level."""
    if isinstance(results, dict) and isinstance(results.get("vocab_size"), int):
        return results["vocab_size"]
    from tunelab.config import DEFAULT_MODEL
    from tunelab.models import cache_dir

    name = str(config.get("model_name") or DEFAULT_MODEL)
    base = cache_dir() / "models" / DEFAULT_MODEL if name.lower() == DEFAULT_MODEL else Path(name)
    info_base = (read_json(run_dir / RUN_INFO) or {}).get("base_model")
    for folder in (run_dir, Path(str(info_base or "")), base):
        values = read_json(folder / "config.json") if str(folder) not in ("", ".") else None
        if values and isinstance(values.get("vocab_size"), int):
            return values["vocab_size"]
    return None


def check_saved_files(run_dir: Path) -> list[Finding]:
    """One finding per damaged or missing file of the saved run (a cut-off tokenizer.json,
    results.json or adapter after a full disk), each naming the file and what to do."""
    fix = damaged_run_fix(run_dir, doctor=False)
    findings = []
    checks = [(p, lambda p: read_json_file(p, "")) for p in sorted(run_dir.glob("*.json"))]
    checks += [
        (p, lambda p: check_safetensors(p, "")) for p in sorted(run_dir.glob("*.safetensors"))
    ]
    if (run_dir / "adapter_config.json").is_file() and not any(
        (run_dir / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")
    ):
        checks.append((run_dir / "adapter_model.safetensors", lambda p: check_safetensors(p, "")))
    for path, check in checks:
        try:
            check(path)
        except TunelabError as error:
            findings.append(
                Finding(
                    "damaged_file",
                    "error",
                    f"{path.name} is damaged or missing",
                    str(error).strip(),
                    fix,
                )
            )
    return findings


def _unreadable_tokenizer(run_dir: Path, error: Exception) -> Finding:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return Finding(
        "damaged_file",
        "error",
        "The saved tokenizer cannot be loaded",
        f"loading the tokenizer files in {run_dir} failed: {first[:200]}",
        damaged_run_fix(run_dir),
    )


def _data_view(run_dir: Path, config: Any) -> tuple[DataView | None, Finding | None]:
    import contextlib
    import io

    from tunelab.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(str(run_dir), config.trust_remote_code)
        with contextlib.redirect_stdout(io.StringIO()):  # the data stage's own progress lines
            return load_data_view(config, tokenizer), None
    except (TunelabError, OSError) as exc:
        return None, Finding(
            "data_unavailable",
            "info",
            "The training data could not be re-read",
            f"{exc}",
            "truncation used the counts recorded in results.json; padding and the EOS probe "
            "were skipped. Run doctor where dataset_path is reachable to check them.",
        )


def findings_json(run_dir: str, findings: list[Finding]) -> str:
    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    items = [{k: clean(v) for k, v in f.as_dict().items()} for f in findings]
    return json.dumps({"run": run_dir, "findings": items}, indent=2)
