"""EleutherAI's lm-evaluation-harness on a tunelab run, without converting anything.

lm-eval's ``hf`` model type loads a base model and a PEFT adapter folder directly, and a tunelab
run folder *is* a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) with
its tokenizer beside it. So the run plugs in as::

    lm_eval --model hf --model_args pretrained=BASE,peft=RUN_DIR,tokenizer=RUN_DIR --tasks ...

``lm_eval_arguments`` builds exactly that from a run folder; ``tunelab eval RUN --lm-eval TASKS``
runs it (lm-eval is an optional extra: pip install lm-eval).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

from tunelab.errors import TunelabError

logger = logging.getLogger(__name__)


def lm_eval_model_args(run_dir: str | Path, dtype: str = "float32") -> str:
    """The ``--model_args`` value for lm-eval's ``hf`` model that loads this run."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise TunelabError(f"{folder} does not exist. Pass a run folder from 'tunelab train'.")
    config_path = folder / "adapter_config.json"
    if config_path.is_file():
        from tunelab.runs import check_run_files

        check_run_files(folder)  # a save cut off by a full disk is named, not parsed
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
        if not base:
            raise TunelabError(
                f"{config_path} has no base_model_name_or_path, so lm-eval cannot load the base "
                "model. Set it to the base model's folder or hub name."
            )
        args = {
            "pretrained": base,
            "peft": str(folder.resolve()),
            "tokenizer": str(folder.resolve()),
        }
    elif (folder / "config.json").is_file():  # a merged or fully fine-tuned model folder
        args = {"pretrained": str(folder.resolve())}
    else:
        raise TunelabError(
            f"{folder} holds neither an adapter (adapter_config.json) nor a model (config.json). "
            "Pass a finished run folder or a merged model folder."
        )
    args["dtype"] = dtype
    from tunelab.models import run_trust_remote_code

    # lm-eval loads with transformers too: the run's own choice, stated, never its default
    args["trust_remote_code"] = str(run_trust_remote_code(folder))
    if _adds_bos(folder, args["trust_remote_code"] == "True"):
        # lm-eval before its PR 3347 (October 2025) encodes without special tokens unless
        # told (add_bos_token False, Gemma aside), so a Llama/Mistral run was scored without
        # the BOS every text it trained on starts with; later versions add it once either way
        args["add_bos_token"] = "True"
    for key, value in args.items():
        if "," in value or "=" in value:
            raise TunelabError(
                f"the {key} path {value!r} contains ',' or '=', which lm-eval's --model_args "
                "cannot carry. Move the run to a path without them."
            )
    return ",".join(f"{key}={value}" for key, value in args.items())


def _adds_bos(folder: Path, trust_remote_code: bool) -> bool:
    """Whether the tokenizer saved in ``folder`` puts BOS in front by itself (``bos_text``);
    False when the folder holds no tokenizer files (lm-eval then reports what it lacks)."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return False
    from tunelab.data.tokenize import bos_text
    from tunelab.models import load_saved_tokenizer

    return bool(bos_text(load_saved_tokenizer(str(folder), trust_remote_code)))


def lm_eval_arguments(
    run_dir: str | Path,
    tasks: str,
    limit: int | None = None,
    out: str | Path | None = None,
    dtype: str = "float32",
    include_path: str | Path | None = None,
) -> list[str]:
    """The lm-eval command line (after ``python -m lm_eval``) that evaluates a run on ``tasks``."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise TunelabError("--lm-eval needs task names, e.g. --lm-eval hellaswag,arc_easy.")
    argv = [
        "--model", "hf",
        "--model_args", lm_eval_model_args(run_dir, dtype),
        "--tasks", ",".join(names),
        "--device", "cpu",
        "--batch_size", "8",
        "--output_path", str(Path(out or Path(run_dir) / "lm_eval")),
    ]  # fmt: skip
    if limit is not None:
        argv += ["--limit", str(limit)]
    if include_path is not None:  # local task YAMLs, e.g. over the user's own data
        argv += ["--include_path", str(include_path)]
    return argv


def run_lm_eval(
    run_dir: str | Path, tasks: str, limit: int | None = None, out: str | Path | None = None
) -> int:
    """Run lm-eval in a child process (its output goes straight to the terminal)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise TunelabError(
            "--lm-eval needs EleutherAI's harness, an optional extra: pip install lm-eval. "
            "Its standard tasks download their data sets from the Hugging Face hub; offline, "
            "point it at local task YAMLs (see docs/evaluation.md)."
        )
    argv = [sys.executable, "-m", "lm_eval", *lm_eval_arguments(run_dir, tasks, limit, out)]
    logger.info("%s", " ".join(argv))
    return subprocess.call(argv)
