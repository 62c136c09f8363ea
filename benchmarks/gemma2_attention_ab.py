"""A/B in one process: a Gemma 2 training step (attention soft-capping on) with tunelab's packed
attention against the stock eager attention it ran before (``fast_path_disable: [attention]``).

A small Gemma 2 (4 layers of Gemma-3-270M's width, 32k vocabulary, random bf16 weights, LoRA r 8
on q/v), 4 packed rows of 512 tokens (examples of 60-200 tokens), bf16 autocast, one forward and
backward per try, the two interleaved. On a shared CPU wall time follows the other processes,
so this measures the process's CPU time with one thread (no time spent waiting for a core).

    python benchmarks/gemma2_attention_ab.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.config import FineTuningConfig
    from tunelab.training.loop import accumulate_gradients, training_mode

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = AutoConfig.for_model(
        "gemma2",
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=32768,
        sliding_window=4096,
        query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.requires_grad_(False)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, lora)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()  # as tunelab trains adapters
    rows = [_packed_row(seed) for seed in range(4)]
    model.train()
    seconds: dict[str, list[float]] = {"packed": [], "stock": []}

    def step(system: str) -> str:
        disable = [] if system == "packed" else ["attention"]
        with training_mode(model, FineTuningConfig(fast_path_disable=disable)) as plan:
            accumulate_gradients(model, [rows], 0, "cpu", precision="bf16")  # warm-up
            start = time.process_time()
            accumulate_gradients(model, [rows], 0, "cpu", precision="bf16")
            seconds[system].append(time.process_time() - start)
        model.zero_grad(set_to_none=True)
        return plan.summary()

    print(step("packed"), step("stock"), sep="\n")
    for _ in range(args.repeats):
        step("packed")
        step("stock")
    ratios = [s / p for p, s in zip(seconds["packed"], seconds["stock"], strict=True)]
    for system, values in seconds.items():
        print(f"{system}: CPU seconds per micro-batch {', '.join(f'{v:.2f}' for v in values)}")
    print(f"stock / packed, median of {len(ratios)}: {statistics.median(ratios):.2f}x")


def _packed_row(seed: int):
    from tunelab.training.batching import Row

    generator = torch.Generator().manual_seed(seed)
    row = Row([], [], [])
    while len(row.input_ids) < 512:
        wanted = int(torch.randint(60, 200, (1,), generator=generator))
        length = min(wanted, 512 - len(row.input_ids))
        ids = torch.randint(3, 32000, (length,), generator=generator).tolist()
        row.input_ids += ids
        row.labels += [-100] + ids[1:]
        row.position_ids += list(range(length))
    return row


if __name__ == "__main__":
    main()
