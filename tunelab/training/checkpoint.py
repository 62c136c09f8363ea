"""Checkpoints a run can resume from exactly: weights, optimizer, schedule, RNG, data position.

Each checkpoint is written into a temporary folder, flushed to disk and renamed into place, so
a crash at any moment leaves the previous checkpoint whole; the free disk space is checked
first. Only tensors and plain data are stored, and they load back with ``weights_only=True``.
The data position is the step number: an epoch's batch order is a function of (seed, epoch).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.files import (
    check_safetensors,
    json_text,
    read_json_file,
    staged_folder,
    tensor_bytes,
)
from tunelab.methods import load_method_state, whole_ranks
from tunelab.run_folder import CHECKPOINTS
from tunelab.training.state import TrainState

STATE = "trainer_state.json"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint whose step had the lowest eval loss (None when none was evaluated)."""
    scored = []
    for path in checkpoint_dirs(run_dir):
        loss = read_state(path).get("eval_loss_at_step")
        if loss is not None:
            scored.append((loss, path))
    return min(scored)[1] if scored else None


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def save_checkpoint(
    run_dir: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: TrainState,
    keep_last: int = 2,
    scaler: Any = None,
    whole: tuple[dict[str, Any] | None, dict[str, Any]] | None = None,
    method_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically; keep the newest ``keep_last`` and the
    best by eval loss (``state.eval_loss_at_step`` marks a checkpoint's eval loss).

    ``whole`` is (model state, name-keyed optimizer state) gathered from sharded processes
    (sharding.py): the checkpoint then holds the same whole adapter and moments as one process's.
    ``method_state``: what the method keeps beside its weights (methods.method_state).
    """
    parent = Path(run_dir) / CHECKPOINTS
    parent.mkdir(parents=True, exist_ok=True)
    # weights + AdamW's two moments (fp32) per trainable value, plus a margin
    trainable = tensor_bytes(model, trainable_only=_is_peft(model))
    target = parent / f"step-{state.step:06d}"
    # staged_folder checks the space, writes beside, flushes and renames: whole or absent
    with staged_folder(target, "a checkpoint", trainable * 3 + 2**20) as staging:
        model_state, optimizer_by_name = whole if whole is not None else (None, None)
        # PEFT: the adapter; full fine-tuning: all weights
        with whole_ranks(model):
            model.save_pretrained(staging, state_dict=model_state)
        blob = {
            "optimizer": optimizer.state_dict() if whole is None else None,
            "optimizer_by_name": optimizer_by_name,
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "method_state": method_state,
        }
        if torch.cuda.is_available():
            blob["cuda_rng"] = torch.cuda.get_rng_state_all()
        if scaler is not None:
            blob["scaler"] = scaler.state_dict()
        torch.save(blob, staging / "training_state.pt")
        (staging / STATE).write_text(json_text(state.to_json(), indent=2))
    keep = set(checkpoint_dirs(run_dir)[-keep_last:])
    best = best_checkpoint(run_dir)
    if best is not None:
        keep.add(best)
    for old in checkpoint_dirs(run_dir):
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_weights(path: Path, model: Any) -> None:
    """Put a checkpoint's weights into ``model``: the adapter of a PEFT model, or every
    weight of a fully fine-tuned one."""
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        adapter = path / "adapter_model.safetensors"
        if not adapter.is_file():
            raise TunelabError(
                f"checkpoint {path} holds no adapter_model.safetensors, so it was not written "
                "by a run with an adapter method. Resume with the run's own config."
            )
        check_safetensors(adapter, damaged_checkpoint_fix(path))
        try:
            set_peft_model_state_dict(model, _read_safetensors(adapter))
        except RuntimeError as error:  # shapes that do not fit the model
            written = read_json_file(path / "adapter_config.json", damaged_checkpoint_fix(path))
            cut = isinstance(written, dict) and written.get("rank_pattern")
            why = (
                "it holds an AdaLoRA adapter cut to its pruned ranks, as tunelab's checkpoints "
                "were before they kept the whole matrices, which cannot resume"
                if cut
                else "it was written for another model or method; resume with the run's own config"
            )
            detail = str(error).strip().splitlines()[-1].strip()[:160]
            raise TunelabError(
                f"checkpoint {path} does not fit this model ({detail}): {why}. "
                + damaged_checkpoint_fix(path)
            ) from None
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise TunelabError(
            f"checkpoint {path} holds no model*.safetensors (full weights), so it was not "
            "written by a full fine-tuning run. Resume with the run's own config."
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        check_safetensors(file, damaged_checkpoint_fix(path))
        state.update(_read_safetensors(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k or "embed" in k}  # tied weights are saved once
    if unexpected or set(missing) - tied:
        raise TunelabError(
            f"checkpoint {path} does not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}). Resume with the run's own config."
        )


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; a damaged one is a TunelabError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except SafetensorError as exc:
        raise TunelabError(
            f"{file} is damaged or not a safetensors file ({exc}). Resume from an earlier "
            f"checkpoint (delete {file.parent}) or start the run again with --overwrite."
        ) from None


def _read_training_state(file: Path) -> dict[str, Any]:
    """The optimizer/scheduler/RNG state, read with weights_only (no code can run); a file
    that needs more than tensors is refused with a TunelabError naming it."""
    import pickle

    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "refused"
        raise TunelabError(
            f"{file} holds Python objects beyond tensors, so loading it could run code; it was "
            f"refused ({first[:200]}). tunelab never writes such a file: resume from another "
            f"checkpoint (delete {file.parent}) or start the run again with --overwrite."
        ) from None


def load_checkpoint(
    path: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any = None,
    weights: bool = True,
) -> TrainState:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer state (step, ...).

    ``weights=False`` when the weights are already in (a sharded run loads them before the
    model is split). A checkpoint from a sharded run resumes unsharded and the other way round.
    """
    from tunelab.training.sharding import is_sharded, load_full_optimizer_state

    state = read_train_state(path)  # an edited one is refused before anything is loaded
    if weights:
        load_weights(path, model)
    try:
        blob = _read_training_state(path / "training_state.pt")
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise TunelabError(
            f"{path / 'training_state.pt'} cannot be read ({str(error).splitlines()[0]}). "
            + damaged_checkpoint_fix(path)
        ) from None
    by_name = blob.get("optimizer_by_name")
    if by_name is None and is_sharded(model):
        by_name = _by_name(blob["optimizer"], model, optimizer)
    if by_name is not None:
        load_full_optimizer_state(model, optimizer, by_name)
    else:
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if "cuda_rng" in blob and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    if scaler is not None and "scaler" in blob:
        scaler.load_state_dict(blob["scaler"])
    load_method_state(model, blob.get("method_state"), path, state.step)
    return state


def damaged_checkpoint_fix(path: Path) -> str:
    return (
        f"Delete the folder {path} to resume from the checkpoint before it, or start the run "
        "again with --overwrite."
    )


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json; a damaged one raises TunelabError naming it."""
    return read_json_file(path / STATE, damaged_checkpoint_fix(path))


def read_train_state(path: Path) -> TrainState:
    """A checkpoint's trainer state, typed; one this version cannot read, or whose step is not
    the step its folder is named for (``step-NNNNNN``), is a TunelabError."""
    state = TrainState.from_json(read_state(path), path / STATE)
    named = path.name.removeprefix("step-")
    if named.isdigit() and int(named) != state.step:
        raise TunelabError(
            f"{path / STATE}: step is {state.step}, but the checkpoint folder {path.name} was "
            f"written at step {int(named)}, so the file was edited or copied from another "
            f"checkpoint. {damaged_checkpoint_fix(path)}"
        )
    return state


def check_resume_point(run_dir: Path, steps: int, patience: int | None = None) -> None:
    """Refuse a resume of ``run_dir`` that has nothing to do or a checkpoint past the end.

    ``steps``: the optimizer steps of the whole run under the config it resumes with;
    ``patience``: its early_stopping_patience. A run that finished (results.json) at ``steps``
    or beyond, or stopped early with a patience that would stop it again at once, has nothing
    left to train; a checkpoint beyond ``steps`` cannot be the start of this run. Raising
    max_steps (or the epochs, or the patience) of a finished run and resuming trains it
    further, which is allowed."""
    from tunelab.run_folder import read_results

    checkpoint = latest_checkpoint(run_dir)
    state = None
    if checkpoint is not None:
        state = read_train_state(checkpoint)
        if state.step > steps:
            raise TunelabError(
                f"{checkpoint / STATE}: step is {state.step}, beyond the {steps} steps this run "
                "trains for (max_steps, or the epochs over the data), so there is nothing to "
                f"resume from it. {damaged_checkpoint_fix(checkpoint)}"
            )
    results = read_results(run_dir)
    finished = results.get("steps") if results is not None else None
    stopped = results.get("stopped_early_at_step") if results is not None else None
    if (
        stopped is not None
        and state is not None
        and state.step == stopped
        and patience is not None
        and state.evals_without_improvement >= patience
    ):
        raise TunelabError(
            f"{run_dir}: this run already finished at step {stopped}, stopped early after "
            f"{state.evals_without_improvement} evaluations without improvement; nothing to "
            "resume. Use --overwrite to train it again, or raise early_stopping_patience (or "
            "unset it) and resume to train it further."
        )
    if isinstance(finished, int) and finished >= steps:
        raise TunelabError(
            f"{run_dir}: this run already finished at step {finished} (its results.json); "
            f"nothing to resume. Use --overwrite to train it again, or raise max_steps (or "
            f"num_epochs) above {finished} and resume to train it further."
        )


def _by_name(state: dict[str, Any], model: Any, optimizer: Any) -> dict[str, Any]:
    """An index-keyed optimizer state (optimizer.state_dict()) keyed by parameter name instead,
    as torch.distributed.checkpoint's full state: the optimizer lists the parameters in the
    same order whether or not the model is sharded."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: v for i, v in state["state"].items()}, "param_groups": groups}
