"""The Python API in the seed's shape: ``FineTuner(config)`` with ``prepare_model()``,
``prepare_dataset()``, ``train()`` and ``save_model()``. The CLI calls exactly these."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.config import RESUMABLE_KEYS, FineTuningConfig, config_notes
from tunelab.data.prepare import PreparedData, format_summary, prepare_examples
from tunelab.data.schema import Example, to_example
from tunelab.data.tokenize import tokenize_examples, uses_chat_template
from tunelab.device import Placement, choose_placement
from tunelab.errors import TunelabError
from tunelab.files import (
    atomic_write_json,
    disk_full_errors,
    ensure_free_space,
    fsync_tree,
    move_into,
    tensor_bytes,
)
from tunelab.methods import (
    apply_method,
    check_target_modules,
    count_parameters,
    family_target_modules,
    format_trainable,
    quantization_config,
)
from tunelab.models import (
    cache_dir,
    load_model,
    load_model_config,
    load_tokenizer,
    model_modules,
    resolve_model,
)
from tunelab.ownership import (
    MANIFEST,
    check_output_folder,
    check_separate,
    finish_output_folder,
    folder_kind,
    foreign_files,
    prepare_output_folder,
    split_owned,
)
from tunelab.run_folder import CONFIG as RUN_CONFIG
from tunelab.run_folder import DATA_MANIFEST, RESULTS, RUN_INFO
from tunelab.training.batching import Row, pack_examples, single_rows
from tunelab.training.distributed import note_once

FINAL_STAGING = ".final-save-"  # the final save's temporary folder inside the run folder
TOKENIZER_EXTRAS = {"vocab.json", "merges.txt", "special_tokens_map.json", "chat_template.jinja"}
TOKENIZED_FORMAT = 2  # bump when the tokenized cache's layout or rendering changes
RESUME_HINT = ", --resume to continue that run"  # the refusal of a non-empty output_dir


def check_resumable(output_dir: Path, config: FineTuningConfig, processes: int = 1) -> None:
    """Refuse to resume a run with settings that would make it a different run.

    batch_size is per process, so the step a checkpoint was trained with is
    gradient_accumulation_steps x processes micro-batches: a run may resume over another
    process count when that product is the same (``processes`` now; the checkpoint's own count
    is in its trainer_state.json).
    """
    saved_path = output_dir / RUN_CONFIG
    if not saved_path.is_file():
        return
    from tunelab.run_folder import read_saved_config
    from tunelab.training.checkpoint import latest_checkpoint, read_state

    saved = read_saved_config(output_dir)
    current = config.to_dict()
    accumulation = "gradient_accumulation_steps"
    changed = [
        key
        for key in current
        if key not in RESUMABLE_KEYS
        and key != accumulation
        and key in saved
        and saved[key] != current[key]
    ]
    checkpoint = latest_checkpoint(output_dir)
    state = read_state(checkpoint) if checkpoint else {}  # a damaged one is named
    saved_processes = state.get("processes", 1)
    per_step = saved.get(accumulation, config.gradient_accumulation_steps) * saved_processes
    if per_step != config.gradient_accumulation_steps * processes:
        fits = per_step // processes if per_step % processes == 0 else None
        raise TunelabError(
            f"cannot resume {output_dir}: its checkpoint took {per_step} micro-batches of "
            f"batch_size rows per step ({accumulation} {saved.get(accumulation)} x "
            f"{saved_processes} process(es)); now {config.gradient_accumulation_steps} x "
            f"{processes}. "
            + (
                f"Resume with --set {accumulation}={fits}."
                if fits
                else f"Resume over a process count that divides {per_step}."
            )
        )
    if changed:
        details = "; ".join(f"{k}: {saved[k]!r} in the run, {current[k]!r} now" for k in changed)
        raise TunelabError(
            f"cannot resume {output_dir}: its checkpoint was trained with other settings "
            f"({details}). Resume with the run's own config ({saved_path}), or start a new run "
            "with --overwrite or another output_dir."
        )


def check_output_dir(
    output_dir: Path, overwrite: bool, resume: bool, config: FineTuningConfig | None = None
) -> list[str]:
    """Refuse an ``output_dir`` this run cannot use, deleting nothing; returns the files in it
    that are not tunelab's (a resumed run leaves them alone and out of its manifest).

    A new run needs an empty or new folder, or ``overwrite`` and a folder holding only what
    tunelab wrote (see ``tunelab.ownership``; ``start_output_dir`` removes those files once the
    run's data and model have passed their checks); ``resume`` needs a tunelab run. The folder
    can never be or contain the run's inputs (data, eval data, a local base model). Raises
    TunelabError.
    """
    if config is not None:
        check_separate(output_dir, run_inputs(config), "output_dir")
    if resume:
        if not output_dir.is_dir() or not any(output_dir.iterdir()):
            raise TunelabError(
                f"--resume was given, but {output_dir} holds no run to resume. Drop --resume "
                "to start a new run."
            )
        if folder_kind(output_dir) != "run":
            raise TunelabError(
                f"--resume was given, but {output_dir} is not a tunelab run (no "
                f"{MANIFEST} or {RUN_CONFIG} with checkpoints), so tunelab will not train into "
                "it. Drop --resume and choose an empty or new output_dir."
            )
        return foreign_files(output_dir, "run")
    check_output_folder(output_dir, "run", overwrite, "output_dir", hint=RESUME_HINT)
    return []


def start_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Remove the old run's files from ``output_dir`` (``overwrite``; checked again, in case
    the folder changed meanwhile) and start the new run's manifest."""
    prepare_output_folder(output_dir, "run", overwrite, "output_dir", hint=RESUME_HINT)


def replaced_bytes(output_dir: Path) -> int:
    """The bytes of the files tunelab wrote in ``output_dir``: space an overwrite frees."""
    if not output_dir.is_dir():
        return 0
    owned, _ = split_owned(output_dir, "run")
    return sum((output_dir / name).lstat().st_size for name in owned)


def run_inputs(config: FineTuningConfig) -> dict[str, str | None]:
    """The local paths a run reads, by config key (a hub id or the default model is none)."""
    model = config.model_name
    local_model = model if model and Path(model).expanduser().exists() else None
    return {
        "dataset_path": config.dataset_path,
        "eval_path": config.eval_path,
        "model_name": local_model,
    }


class FineTuner:
    """Holds one run's state: the config, the model and tokenizer, and the prepared data."""

    def __init__(self, config: FineTuningConfig, device: str | None = None) -> None:
        self.config = config
        self.placement: Placement = choose_placement(config.precision, device)
        self.model_location: str | None = None
        self.tokenizer: Any = None
        self.model: Any = None
        self.prepared: PreparedData | None = None
        self.preference: Any = None  # data.preference.PreparedPreference
        self.token_stats: dict[str, int] = {}

    # --- model ---
    def load_tokenizer(self) -> Any:
        """Resolve the model name (converting the default model once) and load its tokenizer;
        the target modules are checked against the model's config first (no weights read)."""
        if self.tokenizer is None:
            location = resolve_model(self.config.model_name)
            model_config = load_model_config(location, self.config.trust_remote_code)
            modules = model_modules(model_config, self.config.trust_remote_code)
            family = family_target_modules(self.config, model_config.model_type, modules)
            if family:  # decided by the model, so after validation: a new config
                self.config = dataclasses.replace(self.config, target_modules=family[0])
                note_once(family[1])
            check_target_modules(self.config, modules)
            self.model_location = location
            self.tokenizer = load_tokenizer(location, self.config.trust_remote_code)
        return self.tokenizer

    def prepare_model(self, total_steps: int = 0) -> Any:
        """Load the base model and attach the configured method (LoRA by default); prints the
        trainable parameters like the seed does.

        ``total_steps`` is needed only by AdaLoRA, whose rank pruning follows the schedule.
        """
        tokenizer = self.load_tokenizer()  # first: it may decide target_modules (a new config)
        c = self.config
        assert self.model_location is not None
        dtype = self.placement.dtype
        quantization = None
        if c.method == "full" and self.placement.precision != "fp32":
            # every weight is trained: keep fp32 weights so AdamW's small updates are not lost
            dtype = self.placement.fp32_dtype
            note = "full fine-tuning keeps fp32 weights"
        elif c.method == "qlora":
            quantization = quantization_config(c, dtype)
            note = f"{c.quantization_bits}-bit base, compute in {self.placement.precision}"
        else:
            note = self.placement.reason
        note_once(f"Device {self.placement.device}, precision {self.placement.precision} ({note})")
        model = load_model(
            self.model_location,
            dtype,
            c.trust_remote_code,
            # sharded over several GPUs: load into CPU memory, and each GPU gets only its
            # shards of the layers when they are split (training.sharding)
            "cpu" if self.sharded() else self.placement.device,
            quantization_config=quantization,
        )
        if c.add_tokens:
            vocabulary = tokenizer.get_vocab()
            added = tokenizer.add_tokens([t for t in c.add_tokens if t not in vocabulary])
            if added:
                model.resize_token_embeddings(len(tokenizer))
                note_once(f"Added {added} new tokens to the tokenizer and the embeddings.")
        import torch

        torch.manual_seed(c.seed)  # adapter initialisation is part of a reproducible run
        self.model = apply_method(model, c, self.model_location, total_steps)
        note_once(format_trainable(self.model))
        return self.model

    def ineffective_settings(self, several_processes: bool = False) -> list[str]:
        """The config's settings that cannot take effect in this run (config.ineffective_settings)
        and those this machine or process count makes void."""
        from tunelab.config import ineffective_settings
        from tunelab.device import cpu_bf16_features

        c, placement = self.config, self.placement
        out = ineffective_settings(c)
        if c.precision == "bf16" and placement.device == "cpu" and not cpu_bf16_features():
            out.append(
                "precision bf16 on a CPU without AVX512-BF16/AMX is emulated: several times "
                "slower than fp32, with bf16's rounding. Use precision: auto (fp32 here)."
            )
        if c.sharding == "fsdp" and not several_processes:
            out.append(
                "config key 'sharding' is fsdp, but this is one process: nothing is sharded. "
                "Launch with torchrun --nproc_per_node N (or accelerate launch)."
            )
        return out

    def sharded(self) -> bool:
        """Whether this run splits the model over the processes (several processes under
        torchrun / accelerate launch, and sharding: fsdp or accelerate's FSDP plugin)."""
        from tunelab.training.distributed import init_world
        from tunelab.training.sharding import wants_fsdp

        return init_world(self.placement.device).active and wants_fsdp(self.config.sharding)

    # --- data ---
    @property
    def chat(self) -> bool:
        return uses_chat_template(self.load_tokenizer(), self.config.chat_format)

    def prepare_dataset(self, dataset: Any = None, text_column: str = "text") -> list[Row]:
        """Tokenized, packed training rows.

        ``dataset`` may be None (read ``config.dataset_path`` through the data stage), a
        ``datasets.Dataset``, or a list of dicts in any supported schema; ``text_column`` names
        the text column of plain-text data, as in the seed.
        """
        if self.config.objective != "sft":
            return self._preference_rows(dataset)
        if dataset is None:
            self.prepared = prepare_examples(self.config, self.load_tokenizer())
            note_once(format_summary(self.prepared.manifest))
            return self.rows(self.prepared.train, self.prepared.manifest.get("content_hash"))
        return self.rows(self.examples_from(dataset, text_column))

    def _preference_rows(self, dataset: Any = None, held_out: bool = False) -> list[Row]:
        """Preference units (data.preference), tokenized and packed (training.preference)."""
        from tunelab.data.preference import (
            format_preference_summary,
            parse_row,
            prepare_preference,
            tokenize_preference,
        )
        from tunelab.training.preference import pack_units

        if held_out:
            examples = self.preference.eval if self.preference is not None else []
        elif dataset is None:
            self.preference = prepare_preference(self.config)
            weights = (self.config.desirable_weight, self.config.undesirable_weight)
            note_once(format_preference_summary(self.preference.manifest, weights))
            examples = self.preference.train
        else:
            rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
            examples = [
                e for i, r in enumerate(rows)
                for e in parse_row(r, f"dataset[{i}]", self.config.objective)
            ]  # fmt: skip
        units = tokenize_preference(
            examples, self.load_tokenizer(), self.config.max_length, self.chat,
            self.config.system_prompt,
        )  # fmt: skip
        if not held_out:
            tokens = [t for u in units for t in u.sides.values()]
            self.token_stats = {
                "examples": len(units),
                "truncated_examples": sum(t.truncated for t in tokens),
                "tokens": sum(len(t.input_ids) for t in tokens),
                "loss_tokens": sum(t.num_loss_tokens for t in tokens),
            }
        return list(pack_units(units, self.config.max_length, self.config.packing))

    def examples_from(self, dataset: Any, text_column: str = "text") -> list[Example]:
        rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
        examples = []
        for i, row in enumerate(rows):
            if text_column != "text" and isinstance(row, dict) and text_column in row:
                row = {"text": row[text_column]}
            examples.append(
                to_example(
                    row,
                    f"dataset[{i}]",
                    prompt_template=self.config.prompt_template,
                    completion_template=self.config.completion_template,
                )
            )
        return examples

    def rows(self, examples: list[Example], content_hash: str | None = None) -> list[Row]:
        """Tokenize (cached by content hash when the data stage gives one) and pack."""
        tokenizer = self.load_tokenizer()
        c = self.config
        cache_file = None
        if content_hash:
            key = json.dumps(
                [
                    content_hash,
                    self.model_location,
                    len(tokenizer),
                    c.max_length,
                    self.chat,
                    c.system_prompt,
                    TOKENIZED_FORMAT,
                ]
            ).encode()
            cache_file = cache_dir() / "tokenized" / f"{hashlib.sha256(key).hexdigest()[:24]}.npz"
        tokenized = tokenize_examples(
            examples, tokenizer, c.max_length, self.chat, c.system_prompt, cache_file
        )
        truncated = sum(t.truncated for t in tokenized)
        self.token_stats = {
            "examples": len(tokenized),
            "truncated_examples": truncated,
            "examples_without_loss_tokens": sum(t.num_loss_tokens == 0 for t in tokenized),
            "tokens": sum(len(t.input_ids) for t in tokenized),
            "loss_tokens": sum(t.num_loss_tokens for t in tokenized),
        }
        if truncated:
            note_once(
                f"Note: {truncated} of {len(tokenized)} examples were truncated at max_length "
                f"{c.max_length} tokens."
            )
        return self._pack(tokenized, [e.origin for e in examples])

    def _pack(self, tokenized: list[Any], origins: list[str] | None = None) -> list[Row]:
        if self.config.packing:  # off for prompt methods (config.effective_values)
            return pack_examples(tokenized, self.config.max_length, origins)
        return single_rows(tokenized, origins)

    # --- training ---
    def train(
        self,
        train_dataset: list[Row] | None = None,
        eval_dataset: list[Row] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        on_eval: Callable[[int, float], None] | None = None,
    ) -> dict[str, Any]:
        """Fine-tune and write the run folder; returns the results (also in results.json)."""
        from tunelab.training.distributed import global_batch_note, init_world
        from tunelab.training.loop import fit, total_steps
        from tunelab.training.sharding import check_shardable, full_state_for_saving

        # a stop request (tunelab ui) written while the data and model load is this run's; an
        # older one was for a run before it
        started = time.time()
        output_dir = Path(self.config.output_dir)
        # under torchrun every process trains, but only rank 0 checks and writes the folder
        world = init_world(self.placement.device)
        main_process = world.is_main
        sharded = self.sharded()
        c = self.config
        note = global_batch_note(c.batch_size, c.gradient_accumulation_steps, world)
        if note and main_process:
            note_once(note)
        if main_process:  # before the model loads: what this run will not do
            for decided in config_notes(c):
                note_once(f"Note: {decided}")
            for warning in self.ineffective_settings(world.active):
                note_once(warning, logging.WARNING)
        if sharded:
            check_shardable(self.config.method, self.config.optimizer)
        # every refusal (the folder, the data, the model, the space) comes before an overwrite
        # deletes the old run's files: a run refused at start costs nothing
        foreign: list[str] = []
        if main_process:
            foreign = check_output_dir(output_dir, overwrite, resume, self.config)
        if resume:
            self.load_tokenizer()  # the config's model-dependent values decided first
            check_resumable(output_dir, self.config, world.size)
        if train_dataset is None:
            train_dataset = self.prepare_dataset()
        data_stats = dict(self.token_stats)
        if eval_dataset is None:
            eval_dataset = self.eval_rows()
        steps = total_steps(len(train_dataset), self.config, world.size)
        if resume:  # before the model loads: a finished run or an edited checkpoint
            from tunelab.training.checkpoint import check_resume_point

            check_resume_point(output_dir, steps, self.config.early_stopping_patience)
        if self.model is None:
            self.prepare_model(steps)
        self.initialise_adapters(train_dataset, resume)
        if main_process:  # a full disk found now, not after the training it would waste
            freed = replaced_bytes(output_dir) if overwrite and not resume else 0
            ensure_free_space(output_dir, self.final_save_bytes() - freed, "the trained model")
            if not resume:
                start_output_dir(output_dir, overwrite)
        output_dir.mkdir(parents=True, exist_ok=True)
        if main_process:
            self.config.save(output_dir / RUN_CONFIG)
        if self.prepared is not None and main_process:  # what the data stage did
            atomic_write_json(output_dir / DATA_MANIFEST, self.prepared.manifest)
        if self.preference is not None and main_process:
            atomic_write_json(output_dir / DATA_MANIFEST, self.preference.manifest)
        if self.config.init_lora_weights in ("pissa", "olora") and main_process and not resume:
            save_initial_adapter(self.model, output_dir)
        results = fit(
            self.model,
            train_dataset,
            eval_dataset,
            self.config,
            output_dir,
            self.tokenizer.pad_token_id,
            self.placement.device,
            resume=resume,
            on_eval=on_eval,
            precision=self.placement.precision,
            sharded=sharded,
            stop_requests_since=started,
        )
        whole = full_state_for_saving(self.model)  # sharded: every process helps gather
        if not main_process:
            return results  # under torchrun, rank 0 alone writes the run folder
        trainable, total = count_parameters(self.model)
        results.update(
            method=self.config.method,
            precision=self.placement.precision,
            device=self.placement.device,
            train_examples=self._count_examples(),
            trainable_parameters=trainable,
            total_parameters=total,
            peak_memory_mb=round(peak_memory_mb(), 1),
            data=data_stats,
        )
        self.results = results
        self.save_model(state_dict=whole, results=results)
        finish_output_folder(output_dir, "run", foreign)
        return results

    def initialise_adapters(self, rows: list[Row], resume: bool = False) -> None:
        """EVA (from ``rows``) and LoftQ (from the original weights) set the adapters after
        PEFT made them. EVA runs on a resumed run too: its ranks give the adapters the shapes
        the checkpoint holds (it is deterministic), and the checkpoint's weights then replace
        its values; LoftQ's values would be replaced, so it is skipped there."""
        from tunelab.lora_init import eva_batches, initialize_eva, initialize_loftq

        init = self.config.init_lora_weights
        if init == "eva":
            device = next(self.model.parameters()).device
            batches = eva_batches(
                rows, self.config.batch_size, self.tokenizer.pad_token_id, str(device)
            )
            note_once(initialize_eva(self.model, batches, self.config))
            note_once(format_trainable(self.model))  # the ranks may have moved between layers
        elif init == "loftq" and not resume:
            assert self.model_location is not None
            note_once(initialize_loftq(self.model, self.model_location))

    def eval_rows(self) -> list[Row] | None:
        if self.config.objective != "sft":
            held_out = self._preference_rows(held_out=True)
            return held_out or None
        if self.prepared is not None and self.prepared.eval:
            return self.rows(self.prepared.eval)
        if self.config.eval_path:
            from tunelab.data.prepare import load_examples

            return self.rows(load_examples(self.config.eval_path, self.config))
        return None

    def _count_examples(self) -> int | None:
        if self.preference is not None:
            return len(self.preference.train)
        return len(self.prepared.train) if self.prepared is not None else None

    def save_model(
        self,
        output_dir: str | Path | None = None,
        state_dict: dict[str, Any] | None = None,
        results: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the adapter (standard PEFT files), tokenizer, config, run info and ``results``
        (results.json, when given).

        Everything is written into a temporary folder inside the run folder first and moved in
        only once whole, adapter_config.json and results.json last: a full disk or a crash
        never leaves a folder that looks like a finished run. A full disk raises TunelabError
        with the space needed. ``state_dict``: the weights to write instead of the model's own
        (a sharded run's, gathered whole). A folder other than the run's own must be new or
        empty, or hold only what tunelab wrote (``overwrite``); TunelabError otherwise."""
        if self.model is None:
            raise TunelabError("there is no model to save yet: call prepare_model() and train().")
        folder = Path(output_dir or self.config.output_dir)
        elsewhere = output_dir is not None and (
            Path(output_dir).resolve() != Path(self.config.output_dir).resolve()
        )
        if elsewhere:
            prepare_output_folder(folder, "run", overwrite, "save_model folder")
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(f"{FINAL_STAGING}*"):  # a save killed half-way
            shutil.rmtree(leftover, ignore_errors=True)
        needed = self.final_save_bytes()
        what = "the trained model (adapter, tokenizer, results)"
        ensure_free_space(folder, needed, what)
        info = {
            "base_model": self.model_location,
            "chat": self.chat,
            "system_prompt": self.config.system_prompt,
            "precision": self.placement.precision,
            "device": self.placement.device,
            **_versions(),
        }
        converted = {}
        initial = Path(self.config.output_dir) / INITIAL_ADAPTER
        if self.config.init_lora_weights in ("pissa", "olora") and initial.is_dir():
            # saved as plain LoRA (rank 2r) on the original base, which pissa/olora changed
            converted = {"path_initial_model_for_weight_conversion": str(initial)}
        staging = Path(tempfile.mkdtemp(prefix=FINAL_STAGING, dir=folder))
        try:
            with disk_full_errors(folder, what, needed):
                self.model.save_pretrained(staging, state_dict=state_dict, **converted)
                self.tokenizer.save_pretrained(staging)
                self.config.save(staging / RUN_CONFIG)
                atomic_write_json(staging / RUN_INFO, info)
                if results is not None:
                    atomic_write_json(staging / RESULTS, results)
                fsync_tree(staging)
            # the files a reader takes as "finished" arrive last
            move_into(staging, folder, last=("adapter_config.json", "config.json", RESULTS))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if elsewhere:
            finish_output_folder(folder, "run")
        return folder

    def final_save_bytes(self) -> int:
        """About how many bytes the final save writes: the saved weights and the tokenizer
        files (measured in the model folder they come from, when it is local)."""
        weights = tensor_bytes(self.model, self.config.method != "full")
        source = Path(self.model_location or "")
        tokenizer = sum(
            p.stat().st_size
            for p in (source.iterdir() if source.is_dir() else [])
            if p.is_file() and (p.name.startswith("tokenizer") or p.name in TOKENIZER_EXTRAS)
        )
        return weights + tokenizer + 2**20  # config, run info, results


INITIAL_ADAPTER = "initial_adapter"


def save_initial_adapter(model: Any, output_dir: Path) -> Path:
    """A PiSSA/OLoRA adapter as it started (PEFT converts the trained one against it)."""
    folder = output_dir / INITIAL_ADAPTER
    peft_config = model.peft_config["default"]
    init = peft_config.init_lora_weights
    peft_config.init_lora_weights = True  # saved as is, not converted
    try:
        model.save_pretrained(folder)
    finally:
        peft_config.init_lora_weights = init
    return folder


def peak_memory_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import tunelab

    return {
        "tunelab": tunelab.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
