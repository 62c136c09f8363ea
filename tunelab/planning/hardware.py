"""The devices an estimate compares against: a catalogue of common GPUs, and this machine.

GPU figures are the vendors' published dense (no sparsity) tensor-core peaks; a GPU without
bf16 gets its fp16 peak. This machine's peak is measured: a few large matrix multiplies in the
compute precision, because a CPU's real peak depends on its cores, caches and instruction set
far more than any catalogue could say.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    peak_flops_16bit: float  # dense bf16 (or fp16 where the GPU lacks bf16) FLOP/s
    peak_flops_fp32: float  # plain fp32 (no TF32) FLOP/s
    bf16: bool = True
    kind: str = "gpu"
    # usable = total minus what the CUDA context and allocator fragmentation take
    reserved_bytes: int = int(1.0 * GIB)

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.reserved_bytes

    def peak_flops(self, precision: str) -> float:
        return self.peak_flops_fp32 if precision == "fp32" else self.peak_flops_16bit


def _gpu(name: str, gb: float, tflops16: float, tflops32: float, bf16: bool = True) -> Device:
    return Device(name, int(gb * 1e9), tflops16 * 1e12, tflops32 * 1e12, bf16)


# (memory in GB as sold, dense bf16/fp16 TFLOPS, fp32 TFLOPS) from the vendors' data sheets
GPUS = (
    _gpu("T4 16GB", 16, 65, 8.1, bf16=False),
    _gpu("V100 32GB", 32, 125, 15.7, bf16=False),
    _gpu("RTX 3090 24GB", 24, 71, 35.6),
    _gpu("RTX 4090 24GB", 24, 165, 82.6),
    _gpu("A10 24GB", 24, 125, 31.2),
    _gpu("L4 24GB", 24, 121, 30.3),
    _gpu("A100 40GB", 40, 312, 19.5),
    _gpu("RTX A6000 48GB", 48, 155, 38.7),
    _gpu("L40S 48GB", 48, 362, 91.6),
    _gpu("A100 80GB", 80, 312, 19.5),
    _gpu("H100 80GB", 80, 989, 67),
    _gpu("H200 141GB", 141, 989, 67),
    _gpu("MI300X 192GB", 192, 1307, 163),
)


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def gpu_named(name: str) -> Device:
    """A catalogued GPU by name, loosely: "A100 80GB", "a100-80gb", "rtx4090", "H100"."""
    from tunelab.errors import TunelabError, did_you_mean

    by_key: dict[str, list[Device]] = {}
    for device in GPUS:
        short = device.name.rsplit(" ", 1)[0]  # without the memory size
        for key in {_key(device.name), _key(short), _key(short.split()[-1])}:
            by_key.setdefault(key, []).append(device)
    found = by_key.get(_key(name), [])
    if len(found) == 1:
        return found[0]
    if found:
        raise TunelabError(
            f"GPU {name!r} comes in several sizes: {', '.join(d.name for d in found)}. Name one, "
            f"e.g. --gpu '{found[-1].name}'."
        )
    raise TunelabError(
        f"unknown GPU {name!r}.{did_you_mean(_key(name), by_key)} Known GPUs: "
        f"{', '.join(d.name for d in GPUS)}."
    )


def total_ram_bytes() -> int:
    """This machine's physical memory."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@functools.lru_cache(maxsize=8)  # a machine's peak does not change within a process
def measure_matmul_flops(precision: str = "fp32", size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of square matrix multiplies on this CPU in ``precision`` (best of a short run).

    The best repeat, not the mean: other processes on a shared machine only ever slow it down.
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up: thread pool start and kernel selection
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def this_cpu(precision: str, measure: bool = True) -> Device:
    """This machine as a device: its RAM and its measured matmul peak."""
    import torch

    peak = measure_matmul_flops(precision) if measure else 0.0
    name = f"this CPU ({torch.get_num_threads()} threads)"
    return Device(
        name,
        total_ram_bytes(),
        peak_flops_16bit=peak,
        peak_flops_fp32=peak,
        bf16=True,
        kind="cpu",
        reserved_bytes=int(1.0 * GIB),  # the OS, Python, torch and the tokenizer
    )
