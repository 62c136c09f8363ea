"""``tunelab estimate``: parameters, peak memory, speed and which devices a run fits, from the
model's config alone.

Speed comes from FLOPs: a matmul weight costs 2 FLOPs per token forward and 2 more for the
gradient of its input; only trainable weights cost the last 2 for their own gradient (so LoRA
is about 4N per token against full fine-tuning's 6N), gradient checkpointing adds one more
forward, and causal attention adds 4 x context x width per layer forward (half the square:
the mask skips the rest). Achieved speed is the device's peak times a stated utilisation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tunelab.planning.architecture import Architecture, ParameterCount, count_parameters, describe
from tunelab.planning.hardware import GIB, GPUS, Device, gpu_named, this_cpu
from tunelab.planning.memory import MemoryBreakdown, TrainingSetup, estimate_memory

# Share of the peak a fine-tuning step achieves. GPUs: HF/PEFT LoRA runs typically reach
# 35-45% MFU in bf16; QLoRA's dequantisation costs about a quarter more. The CPU figure is a
# share of the *measured* matmul peak (training's smaller, skinnier matmuls and the
# non-matmul work of norms, attention and the optimizer reach about half of it).
UTILIZATION = {"gpu": 0.40, "cpu": 0.50}
QLORA_SLOWDOWN = 0.75
MULTI_DEVICE_SCALING = 0.90  # gradient all-reduce overhead per extra device


@dataclass
class Fit:
    device: Device
    fits: bool
    headroom_bytes: int  # usable memory minus the peak (negative: short by that much)
    tokens_per_second: float


@dataclass
class Advice:
    change: str  # what to change, e.g. "gradient_checkpointing: true"
    peak_bytes: int
    fits: bool
    tokens_per_second: float


@dataclass
class Estimate:
    arch: Architecture
    params: ParameterCount
    setup: TrainingSetup
    memory: MemoryBreakdown
    flops_per_token: float
    target: Device
    utilization: float
    epoch_tokens: int
    fits: list[Fit] = field(default_factory=list)
    advice: list[Advice] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return tokens_per_second(self.flops_per_token, self.target, self.setup, self.utilization)

    @property
    def epoch_seconds(self) -> float:
        return self.epoch_tokens / self.tokens_per_second if self.tokens_per_second else 0.0

    def as_dict(self) -> dict:
        return {
            "model": self.arch.name,
            "config_source": self.arch.source,
            "parameters": {"total": self.params.total, "trainable": self.params.trainable},
            "setup": dataclasses.asdict(self.setup),
            "memory_bytes": self.memory.as_dict(),
            "flops_per_token": self.flops_per_token,
            "target": self.target.name,
            "utilization": self.utilization,
            "tokens_per_second": self.tokens_per_second,
            "epoch_tokens": self.epoch_tokens,
            "epoch_seconds": self.epoch_seconds,
            "fits": {f.device.name: f.fits for f in self.fits},
            "advice": [dataclasses.asdict(a) for a in self.advice],
        }


def training_flops_per_token(
    arch: Architecture, params: ParameterCount, setup: TrainingSetup, context: int | None = None
) -> float:
    """FLOPs of one training token (forward, backward, checkpointing's recompute).

    ``context`` is the mean attended length: with packing each example attends only to
    itself, so it is the mean example length, not max_length.
    """
    context = context or setup.max_length
    head = arch.vocab_size * arch.hidden_size
    body = params.quantizable  # the decoder layers' linear weights (and any untied extras)
    attention = arch.num_layers * 2 * 2 * context * arch.attention_width  # causal: half of 4LW
    adapters = params.total - params.base
    forward = 2 * body + attention + 2 * adapters
    head_forward = 2 * head * setup.loss_fraction  # the LM head runs only on loss positions
    input_grads = forward + head_forward
    if setup.method == "full":
        weight_grads = 2 * body + 2 * head * setup.loss_fraction
    else:
        weight_grads = 2 * adapters
    recompute = forward if setup.gradient_checkpointing else 0
    return forward + head_forward + input_grads + weight_grads + recompute


def tokens_per_second(
    flops_per_token: float, device: Device, setup: TrainingSetup, utilization: float
) -> float:
    peak = device.peak_flops(setup.precision) * utilization
    if setup.method == "qlora":
        peak *= QLORA_SLOWDOWN
    scaling = 1 + (setup.devices - 1) * MULTI_DEVICE_SCALING
    return peak * scaling / flops_per_token if flops_per_token else 0.0


def run_estimate(
    model: str,
    setup: TrainingSetup,
    config_json: str | None = None,
    target: str | None = None,
    utilization: float | None = None,
    epoch_tokens: int = 1_000_000,
    context: int | None = None,
    measure_cpu: bool = True,
) -> Estimate:
    """Everything ``tunelab estimate`` prints. ``target`` names a GPU from the catalogue; by
    default the estimate is for this machine (its RAM and measured matmul peak)."""
    setup.check()
    arch = describe(model, config_json)
    params = count_parameters(arch, setup.method, setup.lora_r, setup.target_modules)
    cpu = this_cpu(setup.precision, measure=measure_cpu)
    device = gpu_named(target) if target else cpu
    share = utilization if utilization is not None else UTILIZATION[device.kind]
    # what the attention keeps depends on the kind of device it runs on
    setup = dataclasses.replace(setup, device_kind=device.kind, context=context or setup.context)
    memory = estimate_memory(arch, params, setup)
    flops = training_flops_per_token(arch, params, setup, context)
    estimate = Estimate(arch, params, setup, memory, flops, device, share, epoch_tokens)
    for candidate in (*GPUS, cpu):
        own = share if candidate is device else UTILIZATION[candidate.kind]
        estimate.fits.append(
            Fit(
                candidate,
                memory.total <= candidate.usable_bytes,
                candidate.usable_bytes - memory.total,
                tokens_per_second(flops, candidate, setup, own),
            )
        )
    if memory.total > device.usable_bytes:
        estimate.advice = advise(arch, setup, device, share, context)
    return estimate


def _changes(setup: TrainingSetup) -> list[tuple[str, dict]]:
    """Single changes that lower peak memory, roughly from cheapest in quality and speed."""
    out: list[tuple[str, dict]] = []
    if not setup.gradient_checkpointing:
        out.append(("gradient_checkpointing: true", {"gradient_checkpointing": True}))
    if setup.batch_size > 1:
        smaller = max(1, setup.batch_size // 4)
        accumulation = setup.gradient_accumulation_steps * setup.batch_size // smaller
        out.append(
            (
                f"batch_size: {smaller}, gradient_accumulation_steps: {accumulation} "
                "(same effective batch)",
                {"batch_size": smaller, "gradient_accumulation_steps": accumulation},
            )
        )
    if setup.optimizer == "adamw" and setup.method == "full":
        out.append(("optimizer: adamw_8bit", {"optimizer": "adamw_8bit"}))
    if setup.method in ("lora", "dora", "full"):
        out.append(("method: qlora (4-bit base)", {"method": "qlora"}))
    for devices in (2, 4, 8):
        if devices > setup.devices and setup.method != "qlora":  # 4-bit weights: no FSDP
            out.append(
                (
                    f"{devices} devices with sharded weights and states (FSDP)",
                    {"devices": devices, "sharding": "fsdp"},
                )
            )
    return out


def advise(
    arch: Architecture,
    setup: TrainingSetup,
    device: Device,
    utilization: float,
    context: int | None = None,
) -> list[Advice]:
    """What to change so the run fits ``device``: each single change; when none is enough,
    the changes combined one by one until the combination fits."""

    def evaluate(label: str, update: dict) -> Advice:
        trial = dataclasses.replace(setup, **update)
        params = count_parameters(arch, trial.method, trial.lora_r, trial.target_modules)
        peak = estimate_memory(arch, params, trial).total
        flops = training_flops_per_token(arch, params, trial, context)
        speed = tokens_per_second(flops, device, trial, utilization)
        return Advice(label, peak, peak <= device.usable_bytes, speed)

    changes = _changes(setup)
    advice = [evaluate(label, update) for label, update in changes]
    if any(a.fits for a in advice):
        return advice
    combined: dict = {}
    for count, (_, update) in enumerate(changes, start=1):
        combined.update(update)
        if count < 2:
            continue
        label = " + ".join(label for label, _ in changes[:count])
        advice.append(evaluate(label, dict(combined)))
        if advice[-1].fits:
            break
    return advice


def _gib(value: float) -> str:
    return f"{value / GIB:,.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.0f} min"
    return f"{seconds / 3600:,.1f} h"


def format_estimate(estimate: Estimate) -> str:
    e, m, s = estimate, estimate.memory, estimate.setup
    share = 100 * e.params.trainable / e.params.total
    lines = [
        f"Model {e.arch.name} ({e.arch.model_type}, config: {e.arch.source})",
        f"Method {s.method}"
        + ("" if s.method == "full" else f", r {s.lora_r} on {', '.join(s.target_modules)}")
        + f"; batch {s.batch_size} x {s.max_length} tokens, {s.precision}"
        + (", gradient checkpointing" if s.gradient_checkpointing else "")
        + f", optimizer {s.optimizer}, {s.devices} device(s)"
        + (  # batch_size is per device (process), as in training
            f"; global batch {s.batch_size * s.gradient_accumulation_steps * s.devices} rows"
            if s.devices > 1
            else ""
        ),
        f"trainable params: {e.params.trainable:,} || all params: {e.params.total:,} || "
        f"trainable%: {share:.4f}",
        "",
        "Peak memory per device",
        f"  weights          {_gib(m.weights):>14}",
        f"  gradients        {_gib(m.gradients):>14}",
        f"  optimizer state  {_gib(m.optimizer):>14}",
        f"  activations      {_gib(m.activations):>14}",
        f"  temporary        {_gib(m.temporary):>14}  (logits chunk, backward buffers)",
        f"  peak             {_gib(m.total):>14}",
    ]
    lines += [f"  note: {n}" for n in m.notes]
    lines += [
        "",
        f"Speed on {e.target.name}: {e.flops_per_token / 1e9:,.2f} GFLOP per token, "
        f"{e.utilization:.0%} of {e.target.peak_flops(s.precision) / 1e12:,.2f} TFLOP/s peak"
        + (" (measured)" if e.target.kind == "cpu" else "")
        + f" -> {e.tokens_per_second:,.0f} tokens/s; "
        f"{_duration(e.epoch_seconds)} per epoch of {e.epoch_tokens:,} tokens",
        "",
        "Fits (usable memory = total minus ~1 GiB for the runtime)",
    ]
    for fit in e.fits:
        verdict = "fits" if fit.fits else "does not fit"
        lines.append(
            f"  {fit.device.name:<28} {_gib(fit.device.memory_bytes):>12}  {verdict:<12} "
            f"~{fit.tokens_per_second:,.0f} tokens/s"
        )
    if e.advice:
        lines += ["", f"It does not fit {e.target.name}. Changes and their peak:"]
        for a in e.advice:
            mark = "fits" if a.fits else "still too big"
            lines.append(
                f"  {a.change}: {_gib(a.peak_bytes)} ({mark}, ~{a.tokens_per_second:,.0f} tokens/s)"
            )
    return "\n".join(lines)
