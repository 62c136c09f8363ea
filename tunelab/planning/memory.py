"""Peak training memory, modelled on what tunelab's loop keeps alive.

The model follows ``tunelab.training``: a frozen base in the compute precision with LoRA
weights, gradients and AdamW states in fp32 (PEFT's ``autocast_adapter_dtype``); full
fine-tuning in fp32 throughout; QLoRA's base in 4-bit NF4 with double quantisation, its other
weights cast to fp32 by ``peft.prepare_model_for_kbit_training``; the body run once and the LM
head only on loss positions (``causal_lm_loss_sum``), whose fp32 log-softmax autograd keeps for
every loss token, chunk by chunk.

Activations are what autograd saves per token and decoder layer. Counted tensor by tensor on a
Llama layer (``tests/planning/test_memory.py`` checks the count against autograd's own saved
tensors):

- each RMSNorm keeps its input upcast to fp32 (4h bytes); full fine-tuning also keeps the
  normalised value and the output, which the trainable projections need (3 x 4h);
- attention keeps q, the expanded k and v, and the output (4 x attention width), plus
  logsumexp; trainable projections also keep the output's reshaped copy;
- a gated MLP keeps gate, up and silu(gate) (3i); with trainable weights also their product;
- each adapted linear keeps its input cast to the adapter's fp32 and, with dropout, the
  dropout mask (1 byte).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.errors import TunelabError
from tunelab.planning.architecture import Architecture, ParameterCount

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# NF4 stores two weights per byte; double quantisation adds one 8-bit absmax per 64 weights
# and one fp32 constant per 256 of those
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES_PER_WEIGHT = 1 + 4 / 4096  # one fp32 scale per row of a 4096-wide layer
OPTIMIZER_BYTES = {"adamw": 8, "adamw-8bit": 2, "sgd": 0}  # per trainable parameter
LOSS_CHUNK_ROWS = 1024  # tunelab.training.loss.chunked_cross_entropy's chunk


@dataclass
class TrainingSetup:
    """What would be trained, and how (the estimate's inputs besides the model)."""

    method: str = "lora"
    lora_r: int = 8
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: float = 0.1
    batch_size: int = 4
    max_length: int = 512
    precision: str = "bf16"  # compute precision of the frozen base
    adapter_precision: str = "fp32"  # tunelab keeps adapters in fp32
    quantization_bits: int = 4
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    gradient_accumulation_steps: int = 1
    devices: int = 1
    sharding: str = "none"  # none: each device holds everything (DDP); fsdp: states are split
    packing: bool = True
    loss_fraction: float = 1.0  # share of tokens that are loss targets (completions)

    def check(self) -> None:
        problems = {
            "precision": self.precision in BYTES,
            "adapter_precision": self.adapter_precision in BYTES,
            "optimizer": self.optimizer in OPTIMIZER_BYTES,
            "sharding": self.sharding in ("none", "fsdp"),
            "quantization_bits": self.quantization_bits in (4, 8),
        }
        for key, ok in problems.items():
            if not ok:
                raise TunelabError(
                    f"estimate setting '{key}' is {getattr(self, key)!r}; see --help."
                )
        for key in ("batch_size", "max_length", "devices", "lora_r", "gradient_accumulation_steps"):
            if getattr(self, key) < 1:
                raise TunelabError(
                    f"estimate setting '{key}' is {getattr(self, key)}, but it must be at least 1."
                )
        if not 0 < self.loss_fraction <= 1:
            raise TunelabError(
                f"estimate setting 'loss_fraction' is {self.loss_fraction}; it must be in (0, 1] "
                "(the share of tokens that are completion tokens)."
            )

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch (packed rows are full)."""
        return self.batch_size * self.max_length


@dataclass
class MemoryBreakdown:
    """Peak bytes on one device, by what holds them."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    temporary: int  # short-lived in forward/backward: logits chunk, mask, backward buffers
    optimizer_step: int  # AdamW's buffer while it takes the step
    # with gradient accumulation, earlier micro-batches' gradients live through each backward
    gradients_during_backward: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def backward_peak(self) -> int:
        """Memory at the start of a backward pass (all activations alive)."""
        held = self.gradients if self.gradients_during_backward else 0
        return self.weights + self.optimizer + self.activations + self.temporary + held

    @property
    def step_peak(self) -> int:
        """Memory while the optimizer steps (all gradients alive, activations freed)."""
        return self.weights + self.optimizer + self.gradients + self.optimizer_step

    @property
    def total(self) -> int:
        """The peak: the larger of the two phases."""
        return max(self.backward_peak, self.step_peak)

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "temporary": self.temporary,
            "optimizer_step": self.optimizer_step,
            "peak": self.total,
        }


def weight_bytes(arch: Architecture, params: ParameterCount, setup: TrainingSetup) -> int:
    adapter = params.total - params.base
    if setup.method == "full":
        return params.base * 4  # tunelab trains full weights in fp32 so small updates land
    if setup.method == "qlora":
        per_weight = NF4_BYTES_PER_WEIGHT if setup.quantization_bits == 4 else INT8_BYTES_PER_WEIGHT
        others = params.base - params.quantizable  # embeddings, norms, LM head: fp32
        return int(params.quantizable * per_weight) + others * 4 + adapter * 4
    return params.base * BYTES[setup.precision] + adapter * BYTES[setup.adapter_precision]


def trainable_bytes(setup: TrainingSetup) -> int:
    """Bytes per trainable weight (and per gradient)."""
    return 4 if setup.method in ("full", "qlora") else BYTES[setup.adapter_precision]


def layer_activation_bytes(arch: Architecture, params: ParameterCount, setup: TrainingSetup) -> int:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
    h, i, width = arch.hidden_size, arch.intermediate_size, arch.attention_width
    full = setup.method == "full"
    b = 4 if full else BYTES[setup.precision]
    norms = 2 * (3 if full else 1) * 4 * h
    attention = (5 if full else 4) * b * width + 4 * arch.num_heads
    mlp = (4 if full else 3) * b * i if arch.gated_mlp else (3 if full else 2) * b * i
    adapters = 0
    if not full:
        mask = 1 if setup.lora_dropout > 0 else 0
        adapter_bytes = BYTES[setup.adapter_precision]
        adapters = sum(d * (adapter_bytes + mask) + 4 * setup.lora_r for d in params.adapted_inputs)
        if setup.method == "dora":  # DoRA also keeps the base output to rescale it
            adapters += 2 * b * len(params.adapted_inputs) * h
    return norms + attention + mlp + adapters


def estimate_memory(
    arch: Architecture, params: ParameterCount, setup: TrainingSetup
) -> MemoryBreakdown:
    """Peak memory of one device training ``setup``."""
    setup.check()
    notes: list[str] = []
    shards = setup.devices if setup.sharding == "fsdp" else 1
    weights = weight_bytes(arch, params, setup) // shards
    per_trainable = trainable_bytes(setup)
    gradients = params.trainable * per_trainable // shards
    optimizer = params.trainable * OPTIMIZER_BYTES[setup.optimizer] // shards

    tokens = setup.tokens
    loss_tokens = int(tokens * setup.loss_fraction)
    h, vocab = arch.hidden_size, arch.vocab_size
    b = 4 if setup.method == "full" else BYTES[setup.precision]
    per_layer = layer_activation_bytes(arch, params, setup)
    if setup.gradient_checkpointing:
        # only each layer's input is kept; one layer's activations are rebuilt in backward
        layers = arch.num_layers * tokens * b * h + tokens * per_layer
        notes.append("gradient checkpointing: one layer's activations are recomputed at a time")
    else:
        layers = arch.num_layers * tokens * per_layer
    # final norm (fp32 input), the hidden states of loss positions, their fp32 log-softmax
    head = tokens * 4 * h + loss_tokens * (b * h + 4 * vocab)
    inputs = tokens * 3 * 8  # input ids, labels, positions (int64)
    mask = setup.batch_size * setup.max_length**2 * b if setup.packing else 0
    activations = layers + head + inputs + mask

    chunk = min(LOSS_CHUNK_ROWS, loss_tokens)
    logits = chunk * vocab * (b + 4 + 4)  # head output, its fp32 copy, its gradient
    # backward through one MLP: the gradients of gate, up and their product, and the residual's
    backward = tokens * (3 * b * arch.intermediate_size + 2 * 4 * h)
    mask_build = setup.batch_size * setup.max_length**2 if setup.packing else 0
    forward_backward = max(logits, backward) + mask_build
    # foreach AdamW allocates one parameter-sized buffer while taking the step
    step = params.trainable * 4 // shards if setup.optimizer != "sgd" else 0
    return MemoryBreakdown(
        weights,
        gradients,
        optimizer,
        activations,
        forward_backward,
        step,
        gradients_during_backward=setup.gradient_accumulation_steps > 1,
        notes=notes,
    )
