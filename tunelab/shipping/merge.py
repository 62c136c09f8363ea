"""Fold a trained adapter into its base model and save a plain transformers model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.files import staged_folder, tensor_bytes
from tunelab.ownership import (
    check_output_folder,
    check_separate,
    finish_output_folder,
    prepare_output_folder,
)
from tunelab.run_folder import CONFIG, RUN_INFO
from tunelab.runs.checks import check_run_files

MERGEABLE = ("LORA", "ADALORA", "IA3")


def read_adapter_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "adapter_config.json"
    if not path.is_file():
        if (run_dir / "config.json").is_file():
            raise TunelabError(
                f"{run_dir} holds a full model already (a 'full' fine-tuning run or a merged "
                "model): there is no adapter to merge. Use the folder as it is."
            )
        raise TunelabError(
            f"{run_dir} has no adapter_config.json: pass the output_dir of 'tunelab train'."
        )
    check_run_files(run_dir)  # a cut-off adapter or tokenizer is named, not parsed
    return json.loads(path.read_text())


def merge_run(
    run_dir: str | Path, out_dir: str | Path, overwrite: bool = False, max_shard_size: str = "2GB"
) -> Path:
    """Merge the run's adapter into an fp32 copy of its base and save it with the tokenizer,
    chat template and generation config; returns ``out_dir``.

    A QLoRA run merges into the dequantised (full-precision) base it was quantised from.
    """

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    adapter_config = read_adapter_config(run_dir)
    kind = adapter_config.get("peft_type", "")
    if kind not in MERGEABLE:
        raise TunelabError(
            f"{run_dir} was trained with {kind.lower().replace('_', ' ')}, which adds virtual "
            "tokens instead of changing weights, so it cannot be merged into the base. Load it "
            "with peft.PeftModel (or tunelab generate) instead."
        )
    base = adapter_config["base_model_name_or_path"]
    local_base = base if base and Path(base).expanduser().exists() else None
    check_separate(out_dir, {"run_dir": run_dir, "the base model": local_base}, "out_dir")
    # refused now, but an old merge is removed only once the new one is made (_merge_into):
    # a base or adapter that fails to load leaves it whole
    check_output_folder(out_dir, "merge", overwrite, "out_dir")
    created = not Path(out_dir).exists()
    try:
        _merge_into(run_dir, Path(out_dir), base, max_shard_size, overwrite)
    except BaseException:
        if created:  # a merge that failed leaves no folder it made (only its manifest is there)
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return Path(out_dir)


def _merge_into(
    run_dir: Path, out_dir: Path, base: str, max_shard_size: str, overwrite: bool
) -> None:
    import torch

    from tunelab.models import load_adapter, load_model, run_trust_remote_code

    trust = run_trust_remote_code(run_dir)
    model = load_model(base, torch.float32, trust)
    from tunelab.models import load_tokenizer

    tokenizer = load_tokenizer(str(run_dir), trust)
    if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # the run added tokens
    merged = load_adapter(model, run_dir).merge_and_unload()
    prepare_output_folder(out_dir, "merge", overwrite, "out_dir")  # checked again, then cleared
    # written beside and renamed: a full disk or a crash never leaves a half model folder
    needed = tensor_bytes(merged) + sum(p.stat().st_size for p in run_dir.glob("tokenizer*"))
    with staged_folder(out_dir, "the merged model", needed) as staging:
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        for name in (RUN_INFO, CONFIG):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, staging / name)
        finish_output_folder(staging, "merge")
