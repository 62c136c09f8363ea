"""Train a few steps with tunelab's real loop in this process and print its peak memory.

Run as a script (``python peak_memory_run.py SETTINGS_JSON``) so each measurement has a process
of its own. Memory is this process's resident set (VmRSS), sampled every millisecond while the
loop trains, minus the resident set before the model was loaded: what the estimate predicts.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from pathlib import Path


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakSampler:
    """The highest resident set seen by a thread polling /proc every millisecond."""

    def __init__(self) -> None:
        self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.001)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def warm_up(precision: str) -> None:
    """Run a tiny model's forward and backward first, so that code and kernels loaded on first
    use (PEFT, oneDNN, autograd) are in the baseline, not counted as training memory."""
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.training.loss import causal_lm_loss_sum

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ids = torch.randint(0, 64, (2, 16))
    positions = torch.cat([torch.arange(8)] * 2).repeat(2, 1)
    batch = {"input_ids": ids, "labels": ids, "position_ids": positions}
    loss, _ = causal_lm_loss_sum(model, batch)
    loss.backward()
    torch.optim.AdamW(model.parameters(), foreach=True).step()


def main(settings: dict) -> dict:
    import torch

    from tunelab.api import FineTuner
    from tunelab.config import FineTuningConfig

    torch.set_num_threads(settings.pop("threads", 2))
    config = FineTuningConfig(**settings)
    tuner = FineTuner(config)
    rows = tuner.prepare_dataset()
    stats = tuner.token_stats
    warm_up(tuner.placement.precision)
    gc.collect()
    before = resident_bytes()
    tuner.prepare_model()
    with PeakSampler() as sampler:
        tuner.train(train_dataset=rows, eval_dataset=None)
    row_tokens = [len(r) for r in rows]
    lengths = [  # packed examples' lengths: an example ends where positions restart
        position + 1
        for r in rows
        for position, following in zip(r.position_ids, [*r.position_ids[1:], 0], strict=True)
        if following == 0
    ]
    return {
        # the length a token attends over, on average (each token its own example's)
        "context": round(sum(n * n for n in lengths) / sum(lengths)),
        "peak_bytes": sampler.peak - before,
        "loss_fraction": stats["loss_tokens"] / stats["tokens"],
        "mean_row_tokens": sum(row_tokens) / len(row_tokens),
        "precision": tuner.placement.precision,
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))))
