"""One flat, typed configuration for a run: YAML in, ``--set`` overrides, early validation.

The field names and defaults follow the seed's ``FineTuningConfig``; everything added keeps
its name self-explanatory. Each field carries its help text once, and that text drives the
starter config written by ``tunelab init`` and the CLI's ``--help``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tunelab.errors import TunelabError, did_you_mean
from tunelab.yaml_numbers import load_yaml, yaml_error_line

DEFAULT_MODEL = "smollm2-135m-instruct"

# The allowed values of a key are its Literal type: validation, ``--help``, ``tunelab init``,
# the web form and the CLI's choices all read them from here.
Scheduler = Literal["linear", "cosine", "constant"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "adamw_8bit"]
Sharding = Literal["none", "fsdp"]
OnNan = Literal["stop", "skip"]
ChatFormat = Literal["auto", "chat", "plain"]
DataSchema = Literal["auto", "text", "prompt_completion", "instruction", "messages", "sharegpt"]
DataFormat = Literal["jsonl", "json", "csv", "tsv", "parquet", "txt", "arrow"]
TxtSplit = Literal["blank_line", "line", "file"]
UnicodeForm = Literal["NFC", "NFKC", "none"]
BiasMitigation = Literal["none", "counterfactual", "rebalance"]
ReportSink = Literal["tensorboard", "mlflow", "wandb"]
# tunelab.training.families.PIECES (kept here so the config needs no torch import)
FastPathPiece = Literal["attention", "loss", "rotary", "norm", "lora_forward", "dropout"]
InitLoraWeights = Literal["default", "gaussian", "pissa", "olora", "eva", "loftq"]
Objective = Literal["sft", "dpo", "ipo", "orpo", "simpo", "kto"]  # as in training.objectives
Method = Literal[
    "lora", "dora", "qlora", "prompt_tuning", "prefix_tuning", "ia3", "adalora", "full"
]
QuantizationBits = Literal[4, 8]

SCHEDULERS: tuple[str, ...] = typing.get_args(Scheduler)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
CHAT_FORMATS: tuple[str, ...] = typing.get_args(ChatFormat)
DATA_FORMATS: tuple[str, ...] = typing.get_args(DataFormat)
TXT_SPLITS: tuple[str, ...] = typing.get_args(TxtSplit)
REPORT_SINKS: tuple[str, ...] = typing.get_args(ReportSink)
FAST_PATH_PIECES: tuple[str, ...] = typing.get_args(FastPathPiece)
INIT_LORA_WEIGHTS: tuple[str, ...] = typing.get_args(InitLoraWeights)
OBJECTIVES: tuple[str, ...] = typing.get_args(Objective)
METHODS: tuple[str, ...] = typing.get_args(Method)
# PEFT prepends their virtual tokens to each sequence and ignores position_ids
PROMPT_METHODS = ("prompt_tuning", "prefix_tuning")

# The stages of a run, in the order ``--help`` and the web form list their keys.
STAGES = {
    "model": "Model: the base model and how it loads",
    "data": "Data: loading, rendering, cleaning and splitting (the data cache key)",
    "method": "Method: the adapter and what it trains",
    "objective": "Objective: the loss (preference tuning)",
    "training": "Training: optimisation and the run's length",
    "evaluation": "Evaluation: held-out loss, early stopping and tunelab eval",
    "output": "Output: the run folder, checkpoints and metric sinks",
}


def _f(
    default: Any, help: str, *, stage: str, resumable: bool = False, data: bool | None = None
) -> Any:
    """A dataclass field with its schema beside the default.

    ``help`` is the key's one documentation; ``stage`` is a key of STAGES; ``resumable``: a
    resumed run may change the key (how long it runs and what it reports, not what it learns);
    ``data``: the data stage reads the key, so it is part of the prepared data's cache key
    (every key of the data stage unless said otherwise).
    """
    assert stage in STAGES, stage
    metadata = {
        "help": help,
        "stage": stage,
        "resumable": resumable,
        "data": stage == "data" if data is None else data,
    }
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class FineTuningConfig:
    """Everything a fine-tuning run needs, flat and typed (the seed's names first)."""

    # --- the seed's fields ---
    model_name: str = _f(
        DEFAULT_MODEL,
        "Base model: 'smollm2-135m-instruct' (shipped with tunelab), a local transformers "
        "folder, a .gguf file, or a hub id.",
        stage="model",
    )
    dataset_path: str = _f(
        "", "Training data: a file (.jsonl, .json, .csv, .txt, ...) or folder.", stage="data"
    )
    output_dir: str = _f(
        "outputs/run",
        "Run folder: adapter, tokenizer, config, metrics, results.",
        stage="output",
        resumable=True,
    )
    lora_r: int = _f(8, "LoRA rank (the adapter's inner dimension).", stage="method")
    lora_alpha: int = _f(
        32, "LoRA scaling numerator: updates are scaled by lora_alpha / lora_r.", stage="method"
    )
    lora_dropout: float = _f(0.1, "Dropout on the LoRA input during training.", stage="method")
    target_modules: list[str] = _f(
        ["q_proj", "v_proj"],
        "Module names that get adapters, or ['all-linear'].",
        stage="method",
    )
    learning_rate: float = _f(3e-4, "Peak learning rate of AdamW.", stage="training")
    num_epochs: int = _f(
        3,
        "Passes over the training data (ignored when max_steps is set).",
        stage="training",
        resumable=True,
    )
    batch_size: int = _f(
        4,
        "Sequences per micro-batch, per process (rows of max_length tokens when packing); the "
        "global batch is batch_size x gradient_accumulation_steps x processes.",
        stage="training",
    )
    max_length: int = _f(
        512,
        "Longest sequence in tokens; longer examples are truncated.",
        stage="training",
        data=True,
    )

    # --- training strategy ---
    # 1, not the seed's 4: a packed row carries several examples, so 4 rows of 512 tokens are
    # about the real tokens of the seed's 4 x 4 padded examples (~2,000 vs ~1,600 on FOLDOC);
    # with 4 the packed default made 5x fewer updates per epoch and ended 2.7% higher in loss
    gradient_accumulation_steps: int = _f(
        1,
        "Micro-batches per optimizer step (raise it when packing is off or rows are short).",
        stage="training",
    )
    warmup_ratio: float = _f(
        0.1, "Share of the optimizer steps spent warming the rate up.", stage="training"
    )
    lr_scheduler: Scheduler = _f(
        "linear", "Learning-rate schedule after warm-up.", stage="training"
    )
    max_steps: int | None = _f(
        None,
        "Optimizer steps to run; overrides num_epochs when set.",
        stage="training",
        resumable=True,
    )
    weight_decay: float = _f(0.0, "AdamW weight decay.", stage="training")
    max_grad_norm: float = _f(
        1.0, "Gradient clipping norm (0 turns clipping off).", stage="training"
    )
    precision: Precision = _f(
        "auto",
        "Compute precision; auto picks bf16 where the CPU/GPU supports it.",
        stage="training",
    )
    packing: bool = _f(
        True,
        "Pack several examples into each row (attention stays inside each example).",
        stage="training",
    )
    group_by_length: bool | None = _f(
        None,
        "Without packing: put rows of similar length into each micro-batch (less padding; the "
        "same rows per epoch, batches in random order); false draws micro-batches at random, "
        "as TRL and transformers do. Default: on for sft, off for the preference objectives "
        "(pairs drawn at random, as TRL's trainers draw them; grouped pairs learned a smaller "
        "margin in benchmarks/dpo_throughput.py). No effect with packing.",
        stage="training",
    )
    seed: int = _f(
        42, "Random seed for initialisation, shuffling and dropout.", stage="training", data=True
    )
    logging_steps: int = _f(
        10, "Optimizer steps between metric lines in metrics.jsonl.", stage="output", resumable=True
    )
    eval_path: str | None = _f(
        None, "Held-out data evaluated during and after training.", stage="data", resumable=True
    )
    eval_steps: int | None = _f(
        None,
        "Evaluate every N optimizer steps (and always at the end).",
        stage="evaluation",
        resumable=True,
    )
    save_steps: int | None = _f(
        None,
        "Checkpoint every N optimizer steps (and at each epoch end).",
        stage="output",
        resumable=True,
    )
    warmup_steps: int | None = _f(
        None,
        "Warm-up length in optimizer steps; overrides warmup_ratio when set.",
        stage="training",
    )
    optimizer: Optimizer = _f(
        "adamw",
        "adamw (fused/foreach torch AdamW) or adamw_8bit (bitsandbytes 8-bit state, falls back "
        "to adamw with a message where bitsandbytes cannot run it).",
        stage="training",
    )
    gradient_checkpointing: bool = _f(
        False,
        "Recompute activations in the backward pass: less memory, about 30% more compute.",
        stage="training",
    )
    fast_path: bool = _f(
        True,
        "Use tunelab's faster training pieces where they are proven equal for the model's "
        "family (false: transformers' and PEFT's own code throughout, for debugging).",
        stage="training",
    )
    fast_path_disable: list[FastPathPiece] = _f(
        [],
        "Pieces of the fast path to run stock: attention, loss, rotary, norm, lora_forward, "
        "dropout (see docs/training.md; `tunelab train` prints which run fast).",
        stage="training",
    )
    sharding: Sharding = _f(
        "none",
        "Several processes (torchrun / accelerate launch): none (each holds the whole model) or "
        "fsdp (decoder layers split across them with FSDP2; accelerate's FSDP plugin sets it).",
        stage="training",
        resumable=True,
    )
    eval_each_epoch: bool = _f(
        True,
        "Evaluate at the end of every epoch (with eval data).",
        stage="evaluation",
        resumable=True,
    )
    save_each_epoch: bool = _f(
        True, "Checkpoint at the end of every epoch.", stage="output", resumable=True
    )
    save_total_limit: int = _f(
        2,
        "Checkpoints kept: the newest this many, plus the one with the best eval loss.",
        stage="output",
        resumable=True,
    )
    early_stopping_patience: int | None = _f(
        None,
        "Stop when the eval loss has not improved for this many evaluations (null: off).",
        stage="evaluation",
        resumable=True,
    )
    early_stopping_threshold: float = _f(
        0.0,
        "An eval loss must beat the best by more than this to count as an improvement.",
        stage="evaluation",
        resumable=True,
    )
    report_to: list[ReportSink] = _f(
        [],
        "Extra metric sinks: tensorboard (event files in the run folder), mlflow, wandb "
        "(Weights & Biases; files in <output_dir>/wandb, WANDB_MODE=offline keeps them local).",
        stage="output",
        resumable=True,
    )
    mlflow_tracking_uri: str | None = _f(
        None,
        "MLflow tracking URI; null uses a local file store in <output_dir>/mlruns.",
        stage="output",
        resumable=True,
    )
    plot: bool = _f(
        True,
        "Write training_curves.png (loss and learning rate) at the end.",
        stage="output",
        resumable=True,
    )
    on_nan: OnNan = _f(
        "stop",
        "A NaN/infinite loss or gradient: stop (the last good checkpoint stays) or skip the step.",
        stage="training",
        resumable=True,
    )

    # --- data rendering ---
    chat_format: ChatFormat = _f(
        "auto",
        "How prompt/completion data is rendered: 'chat' wraps it in the model's chat template, "
        "'plain' joins the strings, 'auto' uses chat when the model has a template.",
        stage="data",
    )
    prompt_template: str | None = _f(
        None,
        "Build the prompt from any columns, e.g. 'What does {term} mean?'.",
        stage="data",
    )
    completion_template: str | None = _f(
        None,
        "Build the completion from any columns, e.g. '{definition}'.",
        stage="data",
    )
    system_prompt: str | None = _f(None, "System message for chat-rendered examples.", stage="data")

    # --- data preparation ---
    data_format: DataFormat | None = _f(
        None,
        "Format of dataset_path/eval_path: jsonl, json, csv, tsv, parquet, txt, or arrow (a "
        "datasets save_to_disk folder); null detects it from the extension and content.",
        stage="data",
    )
    data_schema: DataSchema = _f(
        "auto",
        "Row layout: text, prompt_completion, instruction, messages, sharegpt, or auto (from "
        "the columns); prompt_template/completion_template map any other columns.",
        stage="data",
    )
    txt_split: TxtSplit = _f(
        "blank_line",
        "What one document of a .txt file is: a blank-line separated block, a line, or the file.",
        stage="data",
    )
    unicode_normalization: UnicodeForm = _f(
        "NFC",
        "Unicode normal form applied to all text (NFKC also folds look-alike characters).",
        stage="data",
    )
    fold_whitespace: bool = _f(
        True,
        "Collapse runs of spaces, trailing spaces and extra blank lines.",
        stage="data",
    )
    clean_rules: list[str] = _f(
        [],
        "Regex rewrites applied in order: 'pattern => replacement' (Python re, \\1 for groups) "
        "or a preset name ('foldoc' removes FOLDOC's {links}, <tags>, dates and source notes).",
        stage="data",
    )
    strip_html: bool = _f(
        True, "Remove HTML tags (keeping their text) and decode &entities;.", stage="data"
    )
    pii_redact: bool = _f(
        True,
        "Replace e-mail addresses, phone numbers, IP addresses, card numbers and API keys with "
        "placeholders such as [EMAIL] (they are always counted and reported).",
        stage="data",
    )
    min_chars: int = _f(
        1, "Drop examples with fewer characters than this (after cleaning).", stage="data"
    )
    max_chars: int | None = _f(
        None,
        "Drop examples with more characters than this (null: no limit).",
        stage="data",
    )
    min_tokens: int = _f(
        0, "Drop examples with fewer tokens than this (needs the tokenizer).", stage="data"
    )
    max_tokens: int | None = _f(
        None,
        "Drop examples longer than this many tokens instead of truncating them at max_length.",
        stage="data",
    )
    max_nonprintable_ratio: float | None = _f(
        0.05,
        "Drop examples whose share of control/unprintable characters is higher (null: off).",
        stage="data",
    )
    min_alpha_ratio: float | None = _f(
        0.25,
        "Drop examples (of 20+ characters) whose share of letters is lower (null: off).",
        stage="data",
    )
    max_repeated_ngram_ratio: float | None = _f(
        0.5,
        "Drop examples (of 20+ words) whose share of repeated word 3-grams is higher.",
        stage="data",
    )
    dedup_exact: bool = _f(
        True, "Drop examples equal to an earlier one (ignoring case/spacing).", stage="data"
    )
    dedup_near_threshold: float | None = _f(
        0.8,
        "Drop near duplicates: examples whose word 3-gram Jaccard similarity to an earlier one "
        "is at least this (MinHash/LSH); null turns it off.",
        stage="data",
    )
    eval_split: float = _f(
        0.0,
        "Without eval_path, hold out this fraction of the training data for evaluation "
        "(e.g. 0.1), chosen by seed.",
        stage="data",
    )
    drop_eval_leaks: bool = _f(
        False,
        "Drop training examples equal or near-equal to an eval example (always reported).",
        stage="data",
    )
    bias_report: bool = _f(
        True, "Count demographic terms per group and flag one-sided examples.", stage="data"
    )
    bias_wordlists: list[str] = _f(
        [],
        "Extra word-list JSON files for the bias report (same shape as the shipped ones).",
        stage="data",
    )
    bias_mitigation: BiasMitigation = _f(
        "none",
        "counterfactual adds copies with paired terms swapped (he/she, ...); rebalance "
        "resamples examples of under-represented groups of bias_rebalance_dimension.",
        stage="data",
    )
    bias_rebalance_dimension: str = _f(
        "gender",
        "The word-list dimension that rebalance evens out.",
        stage="data",
    )
    data_cache: bool = _f(
        True,
        "Reuse prepared data from $TUNELAB_CACHE/data when inputs and settings are unchanged.",
        stage="data",
        data=False,
    )
    dataset_mix: dict[str, float] = _f(
        {},
        "Extra training sources and their share of the training set, e.g. "
        "{data/forum.jsonl: 0.2}; dataset_path keeps the rest (see docs/data.md, mixing).",
        stage="data",
    )
    replay_general_share: float = _f(
        0.0,
        "Share of the training set that is general prose replayed against forgetting (e.g. "
        "0.1); tunelab eval's forgetting check then reads only prose that was not replayed.",
        stage="data",
    )
    probe_templates: list[str] = _f(
        [],
        "tunelab eval's knowledge probes: questions that reword a training item, using "
        "{subject} (what it asks about, e.g. 'Explain what {subject} is.') or {question}; "
        "empty: the default set in tunelab/evaluation/probes.py.",
        stage="evaluation",
    )
    max_data_bytes: int = _f(
        1 << 30,
        "Refuse a data path holding more bytes than this (after decompression; counts a "
        "folder's files together): a guard against devices, endless pipes and zip bombs.",
        stage="data",
    )
    max_row_bytes: int = _f(
        16 << 20,
        "Refuse a data row (a line, a text block, a field) longer than this in bytes.",
        stage="data",
    )
    max_rows: int = _f(1_000_000, "Refuse a data path holding more rows than this.", stage="data")
    drop_control_chars: bool = _f(
        True,
        "Remove control characters (C0/C1, e.g. terminal escape sequences) from the data, "
        "keeping tab and newline; the report counts the examples changed.",
        stage="data",
    )

    # --- method ---
    method: Method = _f(
        "lora",
        "Adaptation method: lora, dora, qlora (4/8-bit base), prompt_tuning, prefix_tuning, "
        "ia3, adalora, or full fine-tuning.",
        stage="method",
    )
    use_rslora: bool = _f(
        False, "Rank-stabilised LoRA: scale updates by alpha/sqrt(r).", stage="method"
    )
    rank_pattern: dict[str, int] = _f(
        {}, "Per-module LoRA rank overrides, e.g. {v_proj: 16}.", stage="method"
    )
    alpha_pattern: dict[str, int] = _f(
        {}, "Per-module LoRA alpha overrides, e.g. {v_proj: 64}.", stage="method"
    )
    quantization_bits: QuantizationBits = _f(
        4, "qlora: base weights in 4-bit NF4 (double quantised) or 8-bit.", stage="method"
    )
    num_virtual_tokens: int = _f(
        20, "prompt_tuning / prefix_tuning: learned virtual tokens.", stage="method"
    )
    prompt_init_text: str | None = _f(
        None,
        "prompt_tuning: initialise the virtual tokens from this text instead of randomly.",
        stage="method",
    )
    adalora_init_r: int = _f(
        12, "adalora: starting rank, pruned towards lora_r during training.", stage="method"
    )
    train_embeddings: bool = _f(
        False, "Also train the input embeddings (needed for add_tokens).", stage="method"
    )
    train_lm_head: bool = _f(False, "Also train the output layer (LM head).", stage="method")
    add_tokens: list[str] = _f(
        [], "New tokens to add to the tokenizer (embeddings are resized).", stage="method"
    )
    trust_remote_code: bool = _f(
        False,
        "Run model code shipped with a hub model (off unless you trust its author).",
        stage="model",
    )

    # --- method extras ---
    loraplus_lr_ratio: float | None = _f(
        None,
        "LoRA+: the B matrices learn this many times faster than learning_rate (16 is the "
        "paper's usual value); null: off. lora, dora and qlora only.",
        stage="method",
    )
    init_lora_weights: InitLoraWeights = _f(
        "default",
        "How LoRA starts (PEFT's init_lora_weights): default (B = 0), gaussian, pissa or olora "
        "(the adapter starts from the weights' principal / QR directions and the base keeps "
        "the rest; the saved adapter is converted back to plain LoRA on the original base), "
        "eva (A from the principal directions of each layer's inputs on the training data, "
        "ranks redistributed; B = 0), or loftq (qlora, 4-bit: the adapter starts as the "
        "low-rank part of the quantisation error).",
        stage="method",
    )
    eva_rho: float = _f(
        2.0,
        "init_lora_weights eva: a layer may take up to lora_r x eva_rho of the total rank "
        "budget (1: every layer keeps lora_r).",
        stage="method",
    )
    neftune_noise_alpha: float | None = _f(
        None,
        "NEFTune: uniform noise of this scale (5 is typical) on the input embeddings while "
        "training with objective sft; never at evaluation or generation. null: off.",
        stage="method",
    )

    # --- objective (preference tuning: training.objectives) ---
    objective: Objective = _f(
        "sft",
        "Training objective: sft (next-token loss), or preference tuning on prompt/chosen/"
        "rejected data with dpo (TRL's sigmoid loss), ipo, orpo, simpo; kto on "
        "prompt/completion/label data. dpo, ipo and kto score against the base model.",
        stage="objective",
    )
    beta: float = _f(
        0.1,
        "Preference strength: DPO/IPO/KTO's KL weight, SimPO's reward scale, ORPO's odds-ratio "
        "weight (TRL's beta; 0.1 is TRL's DPO default, SimPO often uses 2.0).",
        stage="objective",
    )
    label_smoothing: float = _f(
        0.0,
        "dpo/simpo: assumed share of flipped preference labels (conservative DPO), [0, 0.5).",
        stage="objective",
    )
    simpo_gamma: float = _f(
        0.5, "simpo: target reward margin (TRL's simpo_gamma).", stage="objective"
    )
    cpo_alpha: float = _f(
        0.0,
        "simpo: weight of the chosen answers' NLL added to the loss (0: pure SimPO).",
        stage="objective",
    )
    desirable_weight: float = _f(
        1.0, "kto: loss weight of answers labelled true.", stage="objective"
    )
    undesirable_weight: float = _f(
        1.0, "kto: loss weight of answers labelled false.", stage="objective"
    )

    def __post_init__(self) -> None:
        # frozen: the values are decided here, once (typed, checked, made effective), and a
        # changed config is a new one (dataclasses.replace validates it again)
        for name in FIELDS:
            object.__setattr__(
                self, name, _coerce(name, getattr(self, name), _HINTS[name], "config")
            )
        validate(self)
        # {key: (the value asked for, why it cannot be, whether the user wrote it)}
        adjusted = {}
        for key, (value, why) in effective_values(self).items():
            asked = getattr(self, key)
            adjusted[key] = (asked, why, asked != _default(key))
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_adjusted", adjusted)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> FineTuningConfig:
        """Read a YAML config, apply ``key=value`` overrides, and validate the result."""
        return load_config(path, overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from tunelab.files import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS = {f.name: f for f in dataclasses.fields(FineTuningConfig)}
_HINTS = typing.get_type_hints(FineTuningConfig)
# what the data stage reads: the prepared data's cache key (tunelab.data.prepare)
DATA_KEYS = tuple(name for name, spec in FIELDS.items() if spec.metadata["data"])
# what a resumed run may change (tunelab.api.check_resumable)
RESUMABLE_KEYS = frozenset(name for name, spec in FIELDS.items() if spec.metadata["resumable"])


def choices_of(name: str) -> tuple[Any, ...] | None:
    """The allowed values of a key (of each item, for a list), read from its Literal type;
    None for a key that takes any value of its type."""
    hint = _HINTS[name]
    if typing.get_origin(hint) is list:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return None


def _check_choices(name: str, value: Any) -> None:
    allowed = choices_of(name)
    if allowed is None:
        return
    for item in value if isinstance(value, list) else [value]:
        if item in allowed:
            continue
        if all(isinstance(a, int) for a in allowed):
            _check(False, name, value, " or ".join(map(str, allowed)))
        hint = did_you_mean(str(item), allowed)
        if isinstance(value, list):
            raise TunelabError(
                f"config key '{name}' names {item!r}; allowed: {', '.join(allowed)} "
                f"({item!r} is not one.{hint}). Change '{name}' in the config or with --set."
            )
        raise TunelabError(
            f"config key '{name}' is {value!r}; allowed values are "
            f"{', '.join(map(repr, allowed))}.{hint}"
        )


def groups_by_length(config: FineTuningConfig) -> bool:
    """Whether the trainer groups rows by length into micro-batches: never with packing;
    ``group_by_length`` where set; else for sft only (preference pairs are drawn at random, as
    TRL draws them: in benchmarks/dpo_throughput.py's 48-pair runs, pairs grouped by length
    learned a held-out margin of 0.046-0.110 over three seeds against 0.100-0.110 drawn at
    random, and TRL's 0.109)."""
    if config.packing:
        return False
    if config.group_by_length is not None:
        return config.group_by_length
    return config.objective == "sft"


def effective_values(config: FineTuningConfig) -> dict[str, tuple[Any, str]]:
    """Values validation decides otherwise than the config asks, ``{key: (value, why)}``;
    the config holds the decided value from then on, and ``ineffective_settings`` warns."""
    c = config
    out: dict[str, tuple[Any, str]] = {}
    if c.packing and c.method in PROMPT_METHODS:
        out["packing"] = (
            False,
            f"method {c.method} prepends its virtual tokens to each sequence and ignores "
            "position_ids, so packed examples would see each other: one example per row",
        )
    return out


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " (or null)"
    if typing.get_origin(hint) is list:
        return "a list of strings"
    if typing.get_origin(hint) is dict:
        return f"a mapping of names to values that are each {_type_name(typing.get_args(hint)[1])}"
    return names.get(hint, str(hint))


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Check ``value`` against the field's type, converting only what is lossless."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(key, value, inner[0], source)
    wrong = TunelabError(
        f"{source}: '{key}' is {value!r} ({type(value).__name__}), expected {_type_name(hint)}. "
        f"Fix the value of '{key}'."
    )
    if origin is Literal:  # the type of its values here; validate checks the values
        return _coerce(key, value, type(typing.get_args(hint)[0]), source)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong
        return list(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        if isinstance(value, float) and not value.is_integer():
            raise wrong
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if origin is dict:
        value_type = typing.get_args(hint)[1]
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise wrong
        return {k: _coerce(f"{key}.{k}", v, value_type, source) for k, v in value.items()}
    return value


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise TunelabError(
            f"config key '{key}' is {value!r}, but it must be {allowed}. Change '{key}' in the "
            f"config or with --set {key}=..."
        )


def validate(config: FineTuningConfig) -> None:
    """Reject impossible values before any heavy work (model-dependent checks live in methods)."""
    c = config
    for name in FIELDS:
        _check_choices(name, getattr(c, name))
        value = getattr(c, name)
        # every number key has a finite meaning: inf or nan would reach the loss or optimizer
        # as inf or nan (a weight decay of inf, a SimPO margin of nan), not refuse anything
        if isinstance(value, float):
            _check(math.isfinite(value), name, value, "a finite number")
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, float) and not math.isfinite(item):
                    _check(False, f"{name}.{key}", item, "a finite number")
    _check(c.lora_r >= 1, "lora_r", c.lora_r, "a whole number of at least 1 (8 is typical)")
    _check(c.lora_alpha > 0, "lora_alpha", c.lora_alpha, "positive (often 2-4 x lora_r)")
    _check(0 <= c.lora_dropout < 1, "lora_dropout", c.lora_dropout, "in [0, 1)")
    _check(len(c.target_modules) > 0, "target_modules", c.target_modules, "a non-empty list")
    _check(
        math.isfinite(c.learning_rate) and c.learning_rate > 0,
        "learning_rate",
        c.learning_rate,
        "a positive number (1e-4 to 1e-3 is usual for LoRA)",
    )
    _check(c.num_epochs >= 1, "num_epochs", c.num_epochs, "at least 1")
    _check(c.batch_size >= 1, "batch_size", c.batch_size, "at least 1")
    _check(c.max_length >= 8, "max_length", c.max_length, "at least 8 tokens")
    for key in ("max_data_bytes", "max_row_bytes", "max_rows"):
        _check(getattr(c, key) >= 1, key, getattr(c, key), "a positive whole number")
    _check(
        c.gradient_accumulation_steps >= 1,
        "gradient_accumulation_steps",
        c.gradient_accumulation_steps,
        "at least 1",
    )
    _check(0 <= c.warmup_ratio < 1, "warmup_ratio", c.warmup_ratio, "in [0, 1)")
    _check(c.max_steps is None or c.max_steps >= 1, "max_steps", c.max_steps, "null or >= 1")
    _check(c.weight_decay >= 0, "weight_decay", c.weight_decay, "zero or positive")
    _check(c.max_grad_norm >= 0, "max_grad_norm", c.max_grad_norm, "zero (off) or positive")
    _check(c.logging_steps >= 1, "logging_steps", c.logging_steps, "at least 1")
    _check(c.eval_steps is None or c.eval_steps >= 1, "eval_steps", c.eval_steps, "null or >= 1")
    _check(c.save_steps is None or c.save_steps >= 1, "save_steps", c.save_steps, "null or >= 1")
    # method
    _check(c.num_virtual_tokens >= 1, "num_virtual_tokens", c.num_virtual_tokens, "at least 1")
    if c.method == "adalora":
        _check(c.adalora_init_r >= c.lora_r, "adalora_init_r", c.adalora_init_r, ">= lora_r")
    for name, rank in c.rank_pattern.items():
        _check(rank >= 1, f"rank_pattern.{name}", rank, "a rank of at least 1")
    if c.add_tokens and not c.train_embeddings and c.method != "full":
        raise TunelabError(
            "config key 'add_tokens' adds tokens whose embeddings start untrained; set "
            "train_embeddings: true (and usually train_lm_head: true) so they can learn."
        )
    if (c.prompt_template is None) != (c.completion_template is None):
        raise TunelabError(
            "config keys 'prompt_template' and 'completion_template' go together: set both "
            "(e.g. prompt_template: 'What does {term} mean?', completion_template: "
            "'{definition}') or neither."
        )

    # method extras
    lora_family = c.method in ("lora", "dora", "qlora")
    if c.loraplus_lr_ratio is not None:
        _check(
            c.loraplus_lr_ratio > 0,
            "loraplus_lr_ratio",
            c.loraplus_lr_ratio,
            "null (off) or a positive ratio (16 is usual)",
        )
        _check(
            lora_family,
            "loraplus_lr_ratio",
            c.loraplus_lr_ratio,
            f"null with method {c.method} (LoRA+ speeds up LoRA's B matrices)",
        )
    if c.init_lora_weights != "default":
        _check(
            lora_family,
            "init_lora_weights",
            c.init_lora_weights,
            f"default with method {c.method} (it sets how LoRA adapters start)",
        )
        if c.init_lora_weights == "eva":
            _check(
                c.method in ("lora", "qlora"),
                "init_lora_weights",
                c.init_lora_weights,
                f"default, gaussian, pissa or olora with method {c.method} (eva sets up plain "
                "LoRA adapters; use method lora or qlora)",
            )
        if c.init_lora_weights == "loftq":
            _check(
                c.method == "qlora" and c.quantization_bits == 4,
                "init_lora_weights",
                c.init_lora_weights,
                "used with method qlora and quantization_bits 4 (LoftQ makes up for a 4-bit "
                f"base's quantisation error; this run has method {c.method}"
                + (f", quantization_bits {c.quantization_bits}" if c.method == "qlora" else "")
                + ")",
            )
        if c.init_lora_weights in ("pissa", "olora", "loftq"):
            _check(
                c.init_lora_weights == "loftq" or c.method != "qlora",
                "init_lora_weights",
                c.init_lora_weights,
                "default, gaussian, eva or loftq with qlora (pissa/olora rewrite base weights "
                "that are quantised)",
            )
            _check(
                c.objective not in ("dpo", "ipo", "kto"),
                "init_lora_weights",
                c.init_lora_weights,
                f"default, gaussian or eva with objective {c.objective}: its reference is the "
                "base with the adapter off, and pissa/olora/loftq start from another model",
            )
    _check(
        c.eva_rho >= 1 and math.isfinite(c.eva_rho), "eva_rho", c.eva_rho, "at least 1 (2 is usual)"
    )
    if c.neftune_noise_alpha is not None:
        _check(
            c.neftune_noise_alpha > 0,
            "neftune_noise_alpha",
            c.neftune_noise_alpha,
            "null (off) or positive (5 is typical)",
        )
        _check(
            c.objective == "sft",
            "neftune_noise_alpha",
            c.neftune_noise_alpha,
            f"null with objective {c.objective} (NEFTune is an SFT technique)",
        )

    # objective
    if c.objective != "sft":
        for key in ("dataset_mix", "replay_general_share"):
            _check(
                not getattr(c, key),
                key,
                getattr(c, key),
                f"unset with objective {c.objective} (it mixes extra SFT text into the training "
                "set; preference rows come from dataset_path alone)",
            )
    _check(c.beta > 0 and math.isfinite(c.beta), "beta", c.beta, "a positive number")
    _check(0 <= c.label_smoothing < 0.5, "label_smoothing", c.label_smoothing, "in [0, 0.5)")
    for key in ("cpo_alpha", "desirable_weight", "undesirable_weight"):
        _check(getattr(c, key) >= 0, key, getattr(c, key), "zero or positive")
    _check(
        c.simpo_gamma >= 0,
        "simpo_gamma",
        c.simpo_gamma,
        "zero or positive (the reward margin SimPO asks of chosen over rejected; below 0 it "
        "would accept a rejected answer that beats the chosen one)",
    )
    if c.objective == "kto":
        _check(
            c.desirable_weight + c.undesirable_weight > 0,
            "desirable_weight",
            c.desirable_weight,
            "positive when undesirable_weight is 0 (with both 0 the KTO loss is 0)",
        )
    if c.label_smoothing and c.objective not in ("dpo", "simpo"):
        raise TunelabError(
            f"config key 'label_smoothing' applies to objective dpo or simpo, not "
            f"{c.objective!r} (TRL has no smoothing for it); set label_smoothing: 0."
        )

    # data preparation
    _check(c.min_chars >= 0, "min_chars", c.min_chars, "zero or positive")
    _check(
        c.max_chars is None or c.max_chars >= max(c.min_chars, 1),
        "max_chars",
        c.max_chars,
        "null or at least min_chars",
    )
    _check(c.min_tokens >= 0, "min_tokens", c.min_tokens, "zero or positive")
    _check(
        c.max_tokens is None or c.max_tokens >= max(c.min_tokens, 1),
        "max_tokens",
        c.max_tokens,
        "null or at least min_tokens",
    )
    for key in ("max_nonprintable_ratio", "min_alpha_ratio", "max_repeated_ngram_ratio"):
        ratio = getattr(c, key)
        _check(ratio is None or 0 <= ratio <= 1, key, ratio, "null (off) or in [0, 1]")
    _check(
        c.dedup_near_threshold is None or 0 < c.dedup_near_threshold <= 1,
        "dedup_near_threshold",
        c.dedup_near_threshold,
        "null (off) or in (0, 1] (0.8 is typical)",
    )
    _check(0 <= c.eval_split < 1, "eval_split", c.eval_split, "in [0, 1) (0.1 holds out 10%)")
    if c.clean_rules:
        from tunelab.data.cleaning import parse_rules  # the rules' own checks name the bad one

        parse_rules(c.clean_rules)
    if c.probe_templates:
        # checked at start, not when tunelab eval reads them after hours of training
        from tunelab.evaluation.probes import check_templates

        check_templates(c.probe_templates)

    # training strategy
    _check(
        c.warmup_steps is None or c.warmup_steps >= 0,
        "warmup_steps",
        c.warmup_steps,
        "null (use warmup_ratio) or zero or more steps",
    )
    _check(c.save_total_limit >= 1, "save_total_limit", c.save_total_limit, "at least 1")
    _check(
        c.early_stopping_patience is None or c.early_stopping_patience >= 1,
        "early_stopping_patience",
        c.early_stopping_patience,
        "null (off) or at least 1 evaluation",
    )
    _check(
        c.early_stopping_threshold >= 0,
        "early_stopping_threshold",
        c.early_stopping_threshold,
        "zero or positive",
    )


def parse_override(text: str) -> tuple[str, Any]:
    """Split a ``key=value`` override.

    For a text key (its type is ``str`` or ``str | None``: prompts, templates, names, paths) the
    value is taken literally, exactly as written after the first ``=``: ``#``, ``:``, ``{...}``,
    quotes, ``yes`` and trailing spaces all stay part of it. The one exception is a key that may
    be null: a value of exactly ``null`` or ``~`` sets it to null. Every other key's value is
    read as YAML 1.2 (so ``1e-4``, ``true``, ``[a, b]`` work).
    """
    if "=" not in text:
        raise TunelabError(
            f"--set expects key=value, got {text!r}. Example: --set learning_rate=1e-4"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    text_key, nullable = _text_field(_HINTS.get(key))
    if text_key:
        return key, None if nullable and raw in ("null", "~") else raw
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _text_field(hint: Any) -> tuple[bool, bool]:
    """(whether the field holds text, whether it may be null) for a field's type hint."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        inner = [a for a in args if a is not type(None)]
        return inner == [str], type(None) in args
    if typing.get_origin(hint) is Literal:  # a choice of words is text; of numbers is not
        return all(isinstance(a, str) for a in typing.get_args(hint)), False
    return hint is str, False


def config_from_dict(
    values: dict[str, Any],
    source: str = "config",
    overrides: list[str] | None = None,
    folder: Path | None = None,
) -> FineTuningConfig:
    """Build a validated config from a mapping plus ``key=value`` overrides. A wrong override
    is blamed on ``--set key=value``, not on the file it overrides. With ``folder`` (the config
    file's own), relative data, output and local model paths are read from there."""
    merged = dict(values)
    sources: dict[str, str] = {}
    for key in merged:
        _check_known(key, source)
    for text in overrides or []:
        key, value = parse_override(text)
        _check_known(key, f"--set {text}")
        merged[key] = value
        sources[key] = f"--set {text}"
    typed = {k: _coerce(k, v, _HINTS[k], sources.get(k, source)) for k, v in merged.items()}
    if folder is not None:
        typed = _resolve_paths(typed, folder)
    config = FineTuningConfig(**typed)
    # a value the user wrote that validation overrode is warned about (ineffective_settings);
    # one left at its default only noted (config_notes)
    adjusted = {key: (asked, why, key in typed) for key, (asked, why, _) in _adjusted(config)}
    object.__setattr__(config, "_adjusted", adjusted)
    return config


def _resolve_paths(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``values`` with relative data, output and local model paths read from ``folder``."""

    def resolved(value: str) -> str:
        return value if Path(value).is_absolute() else str((folder / value).resolve())

    out = dict(values)
    for key in ("dataset_path", "eval_path", "output_dir"):
        if out.get(key):
            out[key] = resolved(out[key])
    if out.get("dataset_mix"):
        out["dataset_mix"] = {resolved(p): share for p, share in out["dataset_mix"].items()}
    model = Path(out.get("model_name", DEFAULT_MODEL))
    if not model.is_absolute() and (folder / model).exists():
        out["model_name"] = str(folder / model)
    return out


def _check_known(key: str, source: str) -> None:
    if key not in FIELDS:
        raise TunelabError(
            f"{source}: unknown config key '{key}'.{did_you_mean(key, FIELDS)} "
            f"Run 'tunelab init' to see every key with its meaning."
        )


def load_config(path: str | Path, overrides: list[str] | None = None) -> FineTuningConfig:
    """Read and validate a YAML run config; relative data/output paths resolve from its folder."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(
            f"config file {path} does not exist. Create one with 'tunelab init {path}'."
        )
    try:
        values = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        where = yaml_error_line(exc)
        raise TunelabError(
            f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)}). "
            "Each line should be 'key: value'."
        ) from None
    except UnicodeDecodeError:
        raise TunelabError(f"{path}: not UTF-8 text. Save the config as UTF-8.") from None
    if not isinstance(values, dict):
        raise TunelabError(
            f"{path}: expected a mapping of 'key: value' lines, found {type(values).__name__}."
        )
    return config_from_dict(values, str(path), overrides, folder=path.resolve().parent)


def yaml_text(value: Any) -> str:
    """One config value as the YAML a user would type (``null``, ``[q_proj, v_proj]``)."""
    if value == "":
        return ""
    dumped = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return dumped.removesuffix("...").strip()


def type_text(name: str) -> str:
    """A key's type in a few characters for ``--help``: ``int``, ``float|null``, ``a|b|c``."""

    def text(hint: Any) -> str:
        origin = typing.get_origin(hint)
        if origin in (types.UnionType, typing.Union):
            return "|".join("null" if a is type(None) else text(a) for a in typing.get_args(hint))
        if origin is Literal:
            return "|".join(map(str, typing.get_args(hint)))
        if origin is list:
            return f"list of {text(typing.get_args(hint)[0])}"
        if origin is dict:
            return f"mapping to {text(typing.get_args(hint)[1])}"
        return getattr(hint, "__name__", str(hint))

    return text(_HINTS[name])


def stage_keys() -> dict[str, list[str]]:
    """``{stage: [key, ...]}`` in STAGES' order, the keys in the schema's order."""
    return {
        stage: [name for name, spec in FIELDS.items() if spec.metadata["stage"] == stage]
        for stage in STAGES
    }


def keys_help(width: int = 100) -> str:
    """Every config key by stage, with its type, default and documentation (``train --help``)."""
    import textwrap

    lines = ["config keys (in the YAML file, or --set KEY=VALUE), by stage:"]
    for stage, names in stage_keys().items():
        lines += ["", f"{STAGES[stage]}:"]
        for name in names:
            default = yaml_text(_default(name)) or "''"
            resumable = ", may change on --resume" if FIELDS[name].metadata["resumable"] else ""
            lines.append(f"  {name} ({type_text(name)}; default {default}{resumable})")
            lines += textwrap.wrap(
                FIELDS[name].metadata["help"],
                width,
                initial_indent="      ",
                subsequent_indent="      ",
            )
    return "\n".join(lines)


def starter_config_text() -> str:
    """The commented YAML that ``tunelab init`` writes: every key, its default and meaning."""
    lines = ["# tunelab run config: edit, then run 'tunelab train <this file>'.", ""]
    for name, spec in FIELDS.items():
        default = (
            spec.default_factory()
            if spec.default_factory is not dataclasses.MISSING
            else spec.default
        )
        if name == "dataset_path":
            default = "data/train.jsonl"
        lines.append(f"# {spec.metadata['help']}")
        if choices_of(name):
            lines.append(f"# one of: {', '.join(map(str, choices_of(name) or ()))}")
        dumped = yaml.safe_dump({name: default}, default_flow_style=True, width=1000).strip()
        lines.append(dumped[1:-1] if dumped.startswith("{") else dumped)
        lines.append("")
    return "\n".join(lines)


# keys each method leaves unused (methods.peft_config_for maps the config onto PEFT's)
_LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern")
_IGNORED_BY_METHOD: dict[str, tuple[str, ...]] = {
    "lora": ("quantization_bits", "adalora_init_r", "num_virtual_tokens", "prompt_init_text"),
    "dora": ("quantization_bits", "adalora_init_r", "num_virtual_tokens", "prompt_init_text"),
    "qlora": ("adalora_init_r", "num_virtual_tokens", "prompt_init_text"),
    "adalora": (
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "quantization_bits",
        "num_virtual_tokens",
        "prompt_init_text",
    ),
    "ia3": (
        *_LORA_KEYS,
        "quantization_bits",
        "adalora_init_r",
        "num_virtual_tokens",
        "prompt_init_text",
    ),
    "prompt_tuning": (
        *_LORA_KEYS,
        "target_modules",
        "quantization_bits",
        "adalora_init_r",
        "train_embeddings",
        "train_lm_head",
    ),
    "prefix_tuning": (
        *_LORA_KEYS,
        "target_modules",
        "quantization_bits",
        "adalora_init_r",
        "prompt_init_text",
        "train_embeddings",
        "train_lm_head",
    ),
    "full": (
        *_LORA_KEYS,
        "target_modules",
        "quantization_bits",
        "adalora_init_r",
        "num_virtual_tokens",
        "prompt_init_text",
        "train_embeddings",
        "train_lm_head",
    ),
}


# SFT data keys the preference data stage does not use (the rest of the data keys it applies)
_SFT_DATA_KEYS = (
    "data_schema",
    "prompt_template",
    "completion_template",
    "min_tokens",
    "max_tokens",
    "bias_wordlists",
    "bias_mitigation",
)


# the objective keys and the objectives whose loss reads them (training.objectives);
# label_smoothing is refused outright elsewhere (validate)
_OBJECTIVE_KEYS = {
    "beta": ("dpo", "ipo", "orpo", "simpo", "kto"),
    "simpo_gamma": ("simpo",),
    "cpo_alpha": ("simpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
}


def _default(name: str) -> Any:
    spec = FIELDS[name]
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def _adjusted(config: FineTuningConfig) -> list[tuple[str, tuple[Any, str, bool]]]:
    """The keys validation set otherwise than asked (FineTuningConfig.__post_init__)."""
    return list(getattr(config, "_adjusted", {}).items())


def config_notes(config: FineTuningConfig) -> list[str]:
    """What validation decided for keys the user left at their default (printed at start)."""
    return [
        f"{key} is {yaml_text(getattr(config, key))} in this run ({why})."
        for key, (_, why, written) in _adjusted(config)
        if not written
    ]


def ineffective_settings(config: FineTuningConfig) -> list[str]:
    """Settings changed from their default that cannot take effect in this run, one sentence
    each (what is ignored and why, and what to do); printed as warnings when training starts,
    before the model loads. Checks that need the hardware or the process count are in api."""
    c = config
    out = [
        f"config key '{key}' ({asked!r}) cannot take effect: {why}; {key} is "
        f"{getattr(c, key)!r} in this run. Set {key}: {yaml_text(getattr(c, key))} to say so."
        for key, (asked, why, written) in _adjusted(c)
        if written
    ]
    changed = [n for n in _IGNORED_BY_METHOD[c.method] if getattr(c, n) != _default(n)]
    if changed:
        keys = ", ".join(f"{n} ({getattr(c, n)!r})" for n in changed)
        out.append(
            f"config key(s) {keys} have no effect with method {c.method}; remove them or "
            "choose the method they belong to."
        )
    if c.packing and c.group_by_length is not None:
        out.append(
            f"config key 'group_by_length' ({c.group_by_length}) has no effect with packing: "
            "packed rows are already full, and batches of them are drawn at random. Set "
            "packing: false to batch single rows, or remove group_by_length."
        )
    if not c.eval_path and c.eval_split == 0:
        unused = [
            n
            for n in ("eval_steps", "early_stopping_patience", "early_stopping_threshold")
            if getattr(c, n) != _default(n)
        ]
        if unused:
            out.append(
                f"config key(s) {', '.join(unused)} need eval data, and there is none (eval_path "
                "is unset and eval_split is 0): no evaluation runs. Set eval_path or eval_split."
            )
    if c.eval_path and c.eval_split > 0:
        out.append(
            f"config key 'eval_split' ({c.eval_split}) is ignored because eval_path is set "
            "(the held-out data comes from eval_path). Remove one of them."
        )
    if c.drop_eval_leaks and not c.eval_path:
        out.append(
            "config key 'drop_eval_leaks' only acts on a separate eval_path (a split of the "
            "training data is not checked for leaks); remove it or set eval_path."
        )
    if c.early_stopping_threshold != 0 and c.early_stopping_patience is None:
        out.append(
            "config key 'early_stopping_threshold' has no effect without "
            "early_stopping_patience; set both or neither."
        )
    if c.max_steps is not None:
        if c.num_epochs != _default("num_epochs"):
            out.append(
                f"config key 'num_epochs' ({c.num_epochs}) has no effect: max_steps "
                f"({c.max_steps}) sets the length of the run. Remove one of the two."
            )
        for key in ("save_steps", "eval_steps"):
            every = getattr(c, key)
            if every is not None and every > c.max_steps:
                out.append(
                    f"config key '{key}' ({every}) is beyond max_steps ({c.max_steps}): it never "
                    f"triggers in this run. Lower {key} or raise max_steps."
                )
        if c.warmup_steps is not None and c.warmup_steps >= c.max_steps:
            out.append(
                f"config key 'warmup_steps' ({c.warmup_steps}) is not below max_steps "
                f"({c.max_steps}): the run never reaches the peak learning rate and never "
                "decays. Lower warmup_steps."
            )
    if c.mlflow_tracking_uri and "mlflow" not in c.report_to:
        out.append(
            "config key 'mlflow_tracking_uri' has no effect without 'mlflow' in report_to; "
            "add it (report_to: [mlflow])."
        )
    if c.bias_rebalance_dimension != _default("bias_rebalance_dimension") and (
        c.bias_mitigation != "rebalance"
    ):
        out.append(
            "config key 'bias_rebalance_dimension' has no effect unless bias_mitigation is "
            "rebalance."
        )
    idle = [
        f"{n} ({getattr(c, n)!r})"
        for n, objectives in _OBJECTIVE_KEYS.items()
        if c.objective not in objectives and getattr(c, n) != _default(n)
    ]
    if idle:
        out.append(
            f"config key(s) {', '.join(idle)} have no effect with objective {c.objective}; "
            "remove them or choose the objective they belong to (docs/preference.md)."
        )
    if c.objective != "sft":
        # the preference data stage (data.preference) reads TRL's formats and filters on
        # characters, not tokens; these SFT data keys do not reach it
        unused = [
            f"{n} ({getattr(c, n)!r})" for n in _SFT_DATA_KEYS if getattr(c, n) != _default(n)
        ]
        if unused:
            out.append(
                f"config key(s) {', '.join(unused)} have no effect with objective "
                f"{c.objective} (they act on SFT data); remove them."
            )
    if c.eva_rho != _default("eva_rho") and c.init_lora_weights != "eva":
        out.append(
            f"config key 'eva_rho' ({c.eva_rho}) has no effect unless init_lora_weights is eva."
        )
    if c.system_prompt and c.chat_format == "plain":
        out.append(
            "config key 'system_prompt' has no effect with chat_format plain (the prompt and "
            "completion are joined as they are); use chat_format chat or remove it."
        )
    return out
