"""Several adapters on one base model: list them, load them side by side, switch, combine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.run_folder import read_results, read_run_info
from tunelab.shipping.merge import read_adapter_config


@dataclass
class AdapterInfo:
    name: str
    path: str
    method: str
    rank: int | None
    targets: str
    base: str
    eval_loss: float | None


def describe(run_dir: str | Path, name: str | None = None) -> AdapterInfo:
    """What a run folder's adapter is: method, rank, targets, base, final eval loss."""
    folder = Path(run_dir)
    config = read_adapter_config(folder)
    results = read_results(folder) or {}
    targets = config.get("target_modules") or []
    return AdapterInfo(
        name=name or folder.name,
        path=str(folder),
        method=str(config.get("peft_type", "?")).lower(),
        rank=config.get("r"),
        targets=",".join(sorted(targets)) if isinstance(targets, list) else str(targets),
        base=config.get("base_model_name_or_path", "?"),
        eval_loss=results.get("eval_loss"),
    )


def format_table(infos: list[AdapterInfo]) -> str:
    header = ("name", "method", "r", "targets", "eval loss", "base model")
    rows = [
        (
            i.name,
            i.method,
            str(i.rank or "-"),
            i.targets,
            f"{i.eval_loss:.4f}" if i.eval_loss is not None else "-",
            i.base,
        )
        for i in infos
    ]
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    )


class AdapterSet:
    """One base model with several named adapters loaded; one is active at a time.

    ``combine`` adds a new adapter whose weight update is the weighted sum of the others'
    (PEFT's ``cat`` combination, exact for LoRA adapters of any ranks).
    """

    def __init__(self, adapters: dict[str, str | Path], precision: str = "fp32") -> None:
        from tunelab.device import choose_placement
        from tunelab.models import (
            add_adapter,
            load_adapter,
            load_model,
            load_tokenizer,
            run_trust_remote_code,
        )

        if not adapters:
            raise TunelabError("give at least one adapter as NAME=RUN_DIR.")
        infos = {name: describe(path, name) for name, path in adapters.items()}
        bases = {i.base for i in infos.values()}
        if len(bases) > 1:
            listing = "; ".join(f"{n}: {i.base}" for n, i in infos.items())
            raise TunelabError(
                f"adapters trained on different base models cannot share one model ({listing})."
                " Load them separately."
            )
        self.infos = infos
        placement = choose_placement(precision)
        first, *rest = adapters.items()
        # the base runs custom code only when every run sharing it was trained allowing that
        trust = all(run_trust_remote_code(path) for path in adapters.values())
        self.tokenizer = load_tokenizer(str(first[1]), trust)
        base = load_model(bases.pop(), placement.dtype, trust, device=placement.device)
        self.model = load_adapter(base, first[1], adapter_name=first[0])
        for name, path in rest:
            add_adapter(self.model, path, name)
        self.model.eval()
        info = read_run_info(first[1])
        self.chat = bool(info.get("chat", getattr(self.tokenizer, "chat_template", None)))
        self.system_prompt = info.get("system_prompt")
        self.active = first[0]

    @property
    def names(self) -> list[str]:
        return list(self.model.peft_config)

    def use(self, name: str) -> None:
        """Make ``name`` the active adapter."""
        if name not in self.model.peft_config:
            from tunelab.errors import did_you_mean

            raise TunelabError(
                f"no adapter named {name!r}; loaded: {', '.join(self.names)}."
                f"{did_you_mean(name, self.names)}"
            )
        self.model.set_adapter(name)
        self.active = name

    def combine(self, weights: dict[str, float], name: str = "combined") -> str:
        """Add (and activate) an adapter equal to the weighted sum of the given ones."""
        import torch

        if name in self.names or hasattr(torch.nn.Module, name):
            raise TunelabError(
                f"{name!r} cannot name an adapter (it is taken, or a PyTorch attribute). Pick "
                "another name, e.g. 'combined'."
            )
        for adapter, weight in weights.items():
            self.use(adapter)  # validates the name
            if weight < 0:
                raise TunelabError(
                    f"adapter weight for {adapter!r} is {weight}; weights must be "
                    ">= 0 for a weighted sum of LoRA updates."
                )
        kinds = {self.infos[a].method for a in weights if a in self.infos}
        if kinds - {"lora"}:
            raise TunelabError(
                f"only LoRA adapters can be combined; these are {', '.join(sorted(kinds))}."
            )
        self.model.add_weighted_adapter(
            list(weights), list(weights.values()), name, combination_type="cat"
        )
        self.use(name)
        return name

    def loaded(self) -> Any:
        """The active adapter as a LoadedModel for tunelab.generation.generate."""
        from tunelab.generation import LoadedModel

        return LoadedModel(
            self.model, self.tokenizer, self.chat, self.system_prompt, f"{self.active}"
        )
