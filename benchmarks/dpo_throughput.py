"""DPO throughput: TRL's DPOTrainer vs tunelab's objective: dpo, same model, LoRA, data, pairs.

Both train the default model (SmolLM2-135M-Instruct) with LoRA r8 on q_proj/v_proj, bf16,
beta 0.1, learning rate 5e-4 decaying linearly without warm-up, --batch pairs per optimizer step
(so the same number of steps: tunelab puts one pair per row, packing off, unless --packing), on
the same --pairs preference pairs for one epoch: FOLDOC entries
(examples/computing-terms/data) as "What does TERM mean?" with the entry's definition as the
chosen answer and another entry's definition as the rejected one (a fixed, seeded pairing).
The reference is the base model with the adapter switched off in both. TRL recomputes
activations in the backward pass (DPOConfig's default gradient_checkpointing=True); tunelab
keeps them (its default): the memory each uses is its own default's. TRL also switches every
dropout off (DPOConfig's default disable_dropout=True, LoRA's included) while tunelab applies
lora_dropout 0.1 (measured to make no difference to accuracy or margin here). Both draw pairs
into steps at random (tunelab's default for preference objectives), each from its own seeded
generator: the same pairs per epoch, not the same pairs per step.

Each system runs in its own child process (peak RSS is its own), after --cooldown idle
seconds. Reported: real (non-padding) tokens per second (the pairs' prompt+answer tokens,
counted once for both, over the training time including tunelab's one reference pass), peak
RSS, and held-out preference accuracy and margin (TRL's rewards/accuracies and
rewards/margins against the base, one shared fp32 scorer) on --heldout pairs built the same way
from heldout.jsonl. Needs the bench extra: pip install 'tunelab[bench]'.

    python benchmarks/dpo_throughput.py
    python benchmarks/dpo_throughput.py --pairs 8 --heldout 4 --cooldown 0   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "computing-terms" / "data"
SYSTEMS = ("trl", "tunelab")
BETA = 0.1


def _first_sentence(text: str) -> str:
    text = re.sub(r"\{([^}]*)\}", r"\1", re.sub(r"<[^>]*>", "", text)).strip()
    return text.split("\n")[0][:300].strip()


def make_pairs(name: str, count: int, seed: int = 0) -> list[dict]:
    """Prompt/chosen/rejected from FOLDOC entries: another entry's definition is rejected."""
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if _first_sentence(r["definition"])][: count * 2]
    generator = random.Random(seed)
    pairs = []
    for i, row in enumerate(rows[:count]):
        other = rows[(i + 1 + generator.randrange(len(rows) - 1)) % len(rows)]
        chosen, rejected = _first_sentence(row["definition"]), _first_sentence(other["definition"])
        if chosen != rejected:
            pairs.append({"prompt": f"What does {row['term']} mean?\n", "chosen": chosen,
                          "rejected": rejected})  # fmt: skip
    return pairs


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")  # fmt: skip


def run_trl(
    args: argparse.Namespace, pairs: list[dict], out: Path
) -> tuple[float, int, object, object]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tunelab.models import resolve_model

    location = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(location)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=args.batch, num_train_epochs=1,
        learning_rate=args.learning_rate, beta=BETA, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=True, bf16=True, max_length=args.max_length,
        seed=42, disable_dropout=True,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer, peft_config=lora_config(),
    )  # fmt: skip
    result = trainer.train()
    return result.metrics["train_runtime"], trainer.state.global_step, trainer.model, tokenizer


def run_tunelab(
    args: argparse.Namespace, pairs: list[dict], out: Path
) -> tuple[float, int, object, object]:
    from tunelab.api import FineTuner
    from tunelab.config import FineTuningConfig

    data = out / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    config = FineTuningConfig(
        dataset_path=str(data), output_dir=str(out / "tunelab"), objective="dpo", beta=BETA,
        lora_r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
        learning_rate=args.learning_rate, batch_size=args.batch, max_length=args.max_length,
        num_epochs=1, chat_format="plain", precision="bf16", logging_steps=1, plot=False,
        save_each_epoch=False, eval_each_epoch=False, seed=42, dedup_near_threshold=None,
        packing=args.packing, warmup_ratio=0.0,
        group_by_length={"default": None, "on": True, "off": False}[args.group_by_length],
    )  # fmt: skip
    tuner = FineTuner(config)
    results = tuner.train()
    seconds = results["train_runtime_seconds"] + results.get("reference_seconds", 0.0)
    return seconds, results["steps"], tuner.model, tuner.load_tokenizer()


def real_tokens(pairs: list[dict], tokenizer) -> int:
    """Prompt+answer tokens of both answers of every pair (what both systems train on)."""
    total = 0
    for p in pairs:
        prompt = len(tokenizer(p["prompt"], add_special_tokens=False)["input_ids"])
        for side in ("chosen", "rejected"):
            total += prompt + len(tokenizer(p[side], add_special_tokens=False)["input_ids"]) + 1
    return total


def heldout_preference(model, tokenizer, pairs: list[dict]) -> tuple[float, float]:
    """(TRL's rewards/accuracies, rewards/margins) against the base, fp32."""
    from tunelab.data.preference import parse_row, tokenize_preference
    from tunelab.evaluation.preference import _summary, pair_logps

    model = model.float()
    examples = [e for i, p in enumerate(pairs) for e in parse_row(p, f"heldout[{i}]", "dpo")]
    units = tokenize_preference(examples, tokenizer, 512, chat=False)
    with model.disable_adapter():
        base = pair_logps(model, units)
    summary = _summary(*pair_logps(model, units), base, BETA)
    return summary["reward_accuracy"], summary["reward_margin"]


def child(args: argparse.Namespace) -> None:
    out = Path(args.out)
    pairs = make_pairs("train.jsonl", args.pairs)
    run = {"trl": run_trl, "tunelab": run_tunelab}[args.child]
    seconds, steps, model, tokenizer = run(args, pairs, out)
    tokens = real_tokens(pairs, tokenizer)
    accuracy, margin = heldout_preference(
        model, tokenizer, make_pairs("heldout.jsonl", args.heldout)
    )
    report = {
        "system": args.child, "pairs": len(pairs), "steps": steps, "real_tokens": tokens,
        "seconds": seconds, "tokens_per_second": tokens / seconds, "peak_rss_mb": peak_rss_mb(),
        "heldout_accuracy": accuracy, "heldout_margin": margin,
    }  # fmt: skip
    (out / f"{args.child}.json").write_text(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=256, help="training pairs (one epoch)")
    parser.add_argument("--heldout", type=int, default=64, help="held-out pairs")
    parser.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (both)")
    parser.add_argument(
        "--packing", action="store_true",
        help="pack tunelab's pairs into rows of --max-length tokens: --batch rows (about 5x the "
        "pairs, 5x fewer steps than TRL's) per step; off by default, a step holds --batch pairs",
    )  # fmt: skip
    parser.add_argument(
        "--group-by-length", choices=("default", "on", "off"), default="default",
        help="tunelab's group_by_length (default: off for preference objectives, as TRL draws "
        "pairs at random; on: pairs of similar length in a step, less padding)",
    )  # fmt: skip
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--cooldown", type=float, default=60.0, help="idle seconds before each")
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    chosen = [s for s in SYSTEMS if s in args.systems.split(",")]
    reports = {}
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        for system in chosen:
            command = [sys.executable, __file__, "--child", system, "--out", out]
            command += ["--pairs", str(args.pairs), "--heldout", str(args.heldout)]
            command += ["--batch", str(args.batch), "--max-length", str(args.max_length)]
            command += ["--learning-rate", str(args.learning_rate)]
            command += ["--packing"] if args.packing else []
            command += ["--group-by-length", args.group_by_length]
            time.sleep(args.cooldown)
            print(f"running {system} ...", flush=True)
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
            reports[system] = json.loads((Path(out) / f"{system}.json").read_text())
    print(
        "\n| system | pairs | steps | real tokens/s | peak RSS MiB | held-out accuracy | margin |"
    )
    print("|---|---|---|---|---|---|---|")
    for system, r in reports.items():
        print(
            f"| {system} | {r['pairs']} | {r['steps']} | {r['tokens_per_second']:.1f} "
            f"| {r['peak_rss_mb']:.0f} | {r['heldout_accuracy']:.1%} | {r['heldout_margin']:.3f} |"
        )
    if len(reports) == 2:
        ours, theirs = reports["tunelab"], reports["trl"]
        print(
            f"\ntunelab vs TRL: {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x "
            f"the real tokens/s, peak RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x"
        )


if __name__ == "__main__":
    main()
