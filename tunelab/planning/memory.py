"""Peak training memory, modelled on what tunelab's loop keeps alive.

The model follows ``tunelab.training``: a frozen base in the compute precision with LoRA
weights, gradients and AdamW states in fp32 (PEFT's ``autocast_adapter_dtype``), the forward
under bf16 autocast with PEFT's fp32 input casting switched off (``training.precision``); full
fine-tuning keeps fp32 weights and autocast caches a 16-bit copy of every linear weight for the
forward and backward; QLoRA's base in 4-bit NF4 with double quantisation, its other weights cast
to fp32 by ``peft.prepare_model_for_kbit_training``; attention over packed rows without a dense
mask (``training.attention``); the body run once and the LM head only on loss positions
(``causal_lm_loss_sum``), whose fp32 log-softmax autograd keeps for every loss token.

Activations are what autograd saves per token and decoder layer. Counted tensor by tensor on a
Llama layer in tunelab's training step (``tests/planning/test_memory.py`` checks the count
against autograd's own saved tensors); a frozen linear layer saves nothing (its input gradient
needs only its weight):

- each frozen RMSNorm keeps its input and one fp32 number per token (``training.norm``); a
  trainable one (full fine-tuning) its input upcast to fp32 and the normalised 16-bit value;
- attention keeps q, k and v and, on a CPU, for examples up to 512 tokens
  (``training.attention``), the 16-bit attention weights: heads x the example's length padded
  to its bucket, taken here as ``context`` (the mean example length, when given) or
  ``max_length`` (the worst case, every example that long); a trainable output projection also
  keeps its input;
- a gated MLP keeps gate, silu(gate) and up (3i); a trainable down projection also its input;
- LoRA keeps the input of each adapted layer (shared by layers reading the same tensor when
  there is no dropout; with dropout each adapter keeps its own dropped copy and its 0/1 mask,
  both in the input's dtype) and the r-wide output of lora_A.
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
OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2}  # per trainable parameter


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
    loss_fraction: float = 1.0  # share of tokens that are loss targets (completions)
    # mean attended length (tokens' own example, token-weighted); None: max_length, the worst
    # case of every example that long
    context: int | None = None
    device_kind: str = "cpu"  # cpu or gpu: the attention kernels (and what they keep) differ

    def check(self) -> None:
        allowed = {
            "precision": tuple(BYTES),
            "adapter_precision": tuple(BYTES),
            "optimizer": tuple(OPTIMIZER_BYTES),
            "sharding": ("none", "fsdp"),
            "quantization_bits": (4, 8),
            "device_kind": ("cpu", "gpu"),
        }
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise TunelabError(
                    f"estimate setting '{key}' is {getattr(self, key)!r}; expected one of "
                    f"{', '.join(map(str, values))}."
                )
        for key in ("batch_size", "max_length", "devices", "lora_r", "gradient_accumulation_steps"):
            if getattr(self, key) < 1:
                raise TunelabError(
                    f"estimate setting '{key}' is {getattr(self, key)}, but it must be at least 1."
                )
        if self.sharding == "fsdp" and self.method == "qlora":
            raise TunelabError(
                "estimate: sharding fsdp with method qlora is not something tunelab trains "
                "(4-bit base weights are not sharded); estimate qlora with sharding none."
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
    notes: list[str] = field(default_factory=list)

    @property
    def backward_peak(self) -> int:
        """Memory in a backward pass: activations alive, gradients being filled in (counted
        whole: with accumulation they are, and without it the last layers' gradients exist
        while the first layers' activations are still held)."""
        return self.weights + self.optimizer + self.activations + self.temporary + self.gradients

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
        adapter_bytes = BYTES[setup.adapter_precision]
        return int(params.quantizable * per_weight) + others * 4 + adapter * adapter_bytes
    return params.base * BYTES[setup.precision] + adapter * BYTES[setup.adapter_precision]


def trainable_bytes(setup: TrainingSetup) -> int:
    """Bytes per trainable weight (and per gradient)."""
    return 4 if setup.method == "full" else BYTES[setup.adapter_precision]


# adapted layers that read the same tensor (without dropout, they share one saved input)
_SHARED_INPUT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp"}
_SHARED_INPUT["up_proj"] = "mlp"


def layer_activation_bytes(arch: Architecture, params: ParameterCount, setup: TrainingSetup) -> int:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
    from tunelab.training.attention import MATMUL_MAX_LENGTH, bucket_of

    h, i, width = arch.hidden_size, arch.intermediate_size, arch.attention_width
    kv_width = arch.num_kv_heads * arch.head_dim
    b = BYTES[setup.precision]
    full = setup.method == "full"
    norms = 2 * (4 * h + 4 + b * h) if full else 2 * (b * h + 4)
    attention = b * (width + 2 * kv_width) + (b * width if full else 0)
    if setup.device_kind == "cpu":  # the matmul path keeps the attention weights
        length = min(bucket_of(setup.context or setup.max_length), setup.max_length)
        attention += arch.num_heads * b * min(length, MATMUL_MAX_LENGTH)
    else:  # SDPA keeps its output and one fp32 log-sum-exp per head
        attention += b * width + 4 * arch.num_heads
    if arch.gated_mlp:
        mlp = 3 * b * i + (b * i if full else 0)
    else:
        mlp = 2 * b * i + (b * i if full else 0)
    if full:
        return norms + attention + mlp
    adapters, seen = 0, set()
    for name, inputs in params.adapted_inputs:
        adapters += b * setup.lora_r  # lora_A's output, saved by lora_B
        if setup.lora_dropout > 0:
            adapters += inputs * 2 * b  # each adapter's own dropped copy and its 0/1 mask
            continue
        key = _SHARED_INPUT.get(name, name)
        if key not in seen:
            seen.add(key)
            adapters += inputs * b
        if setup.method == "dora":  # DoRA also keeps the base output to rescale it
            adapters += b * h
    return norms + attention + mlp + adapters


def estimate_memory(
    arch: Architecture, params: ParameterCount, setup: TrainingSetup
) -> MemoryBreakdown:
    """Peak memory of one device training ``setup``."""
    setup.check()
    notes: list[str] = []
    shards = setup.devices if setup.sharding == "fsdp" else 1
    weights = weight_bytes(arch, params, setup)
    gradients = params.trainable * trainable_bytes(setup)
    optimizer = params.trainable * OPTIMIZER_BYTES[setup.optimizer]
    if shards > 1:
        # training.sharding: each decoder layer is split over the devices, and gathered whole
        # for its forward and backward (count two: the one running and the next); the
        # embeddings and the LM head stay whole on every device, with their gradients and
        # AdamW states when they are trained (full fine-tuning)
        whole = arch.vocab_size * arch.hidden_size * (1 if arch.tied_embeddings else 2)
        per_weight = 4 if setup.method == "full" else BYTES[setup.precision]
        outside = whole * per_weight
        layers_bytes = max(0, weights - outside)
        weights = outside + layers_bytes // shards + 2 * layers_bytes // arch.num_layers
        outside_trained = whole if setup.method == "full" else 0
        trained_here = outside_trained + (params.trainable - outside_trained) // shards
        gradients = trained_here * trainable_bytes(setup)
        optimizer = trained_here * OPTIMIZER_BYTES[setup.optimizer]
        notes.append(
            f"FSDP over {shards} devices: decoder layers split (one gathered at a time, and the "
            "next), embeddings and LM head whole on each"
        )

    tokens = setup.tokens
    loss_tokens = max(1, int(tokens * setup.loss_fraction))
    h, vocab = arch.hidden_size, arch.vocab_size
    b = BYTES[setup.precision]
    per_layer = layer_activation_bytes(arch, params, setup)
    if setup.gradient_checkpointing:
        # only each layer's input is kept; one layer's activations are rebuilt in backward
        layers = arch.num_layers * tokens * b * h + tokens * per_layer
        notes.append("gradient checkpointing: one layer's activations are recomputed at a time")
    else:
        layers = arch.num_layers * tokens * per_layer
    # final norm (fp32 input), and for each loss position the fp32 log-softmax cross-entropy
    # keeps (plus the hidden state itself when the LM head is trained)
    head = tokens * 4 * h + loss_tokens * (4 * vocab + (b * h if setup.method == "full" else 0))
    inputs = tokens * 3 * 8  # input ids, labels, positions (int64)
    activations = layers + head + inputs

    # imported here: training.loss loads torch, which `tunelab --help` should not wait for
    from tunelab.training.loss import BLOCK_ROWS, CHUNK_ROWS, SOFTMAX_ROWS

    if setup.method == "full":  # a trained head: chunks through autograd (training.loss)
        chunk = min(CHUNK_ROWS, loss_tokens)
        logits = chunk * vocab * (b + 4 + 4)  # head output, its fp32 copy, its gradient
    else:  # frozen head: fused, a block of 16-bit logits and a slice of it in fp32
        logits = min(BLOCK_ROWS, loss_tokens) * vocab * b
        logits += min(SOFTMAX_ROWS, loss_tokens) * vocab * 4
    # backward through one MLP: the gradients of gate, up and their product, and the residual's
    backward = tokens * (3 * b * arch.intermediate_size + 2 * 4 * h)
    temporary = max(logits, backward)
    if setup.method == "full" and b < 4:
        # autocast's 16-bit copy of each linear weight lives through forward and backward
        temporary += params.quantizable * b // shards
    # foreach AdamW allocates parameter-sized buffers while it steps; fused AdamW (fp32
    # parameters, what tunelab picks) works in place
    step = 0
    return MemoryBreakdown(
        weights,
        gradients,
        optimizer,
        activations,
        temporary,
        step,
        notes=notes,
    )
