"""Pick the device and compute precision for a run, and say why."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError


@dataclass
class Placement:
    device: str  # "cpu" or "cuda"
    precision: str  # "fp32", "bf16" or "fp16"
    reason: str

    @property
    def dtype(self):  # noqa: ANN201 (torch imported lazily)
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            self.precision
        ]

    @property
    def fp32_dtype(self):  # noqa: ANN201
        import torch

        return torch.float32


def cpu_bf16_features() -> list[str]:
    """The CPU features that make bf16 matrix multiplies fast (AVX512-BF16, AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags]


def choose_placement(precision: str = "auto", device: str | None = None) -> Placement:
    """CUDA when present; bf16 where the hardware runs it natively, else fp32. Under torchrun
    with several processes, each process's GPU is the one its LOCAL_RANK names (cuda:N)."""
    import torch

    from tunelab.training.distributed import local_device

    device = local_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.startswith("cuda"):
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "auto":
            chosen = "bf16" if bf16_ok else "fp16"
            return Placement(device, chosen, f"CUDA {'supports' if bf16_ok else 'lacks'} bf16")
        if precision == "bf16" and not bf16_ok:
            raise TunelabError(
                "precision bf16 was asked for, but this GPU lacks bf16. Use "
                "precision: fp16 or fp32."
            )
        return Placement(device, precision, "set in the config")
    features = cpu_bf16_features()
    if precision == "fp16":
        raise TunelabError(
            "precision fp16 needs a CUDA GPU; on a CPU use precision: bf16 (where supported) "
            "or fp32, or leave it at auto."
        )
    if precision == "auto":
        if features:
            return Placement(device, "bf16", f"the CPU has {', '.join(features)}")
        return Placement(device, "fp32", "the CPU lacks AVX512-BF16/AMX, so bf16 would be slow")
    return Placement(device, precision, "set in the config")
