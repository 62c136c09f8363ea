"""Training throughput: the seed recipe vs TRL's SFTTrainer vs tunelab, on the same data and model.

All three fine-tune the default model (SmolLM2-135M-Instruct) with LoRA r8 on q_proj/v_proj on
FOLDOC entries (examples/computing-terms/data/train.jsonl) as plain text, on the same budget of
real (non-padding) training tokens: --steps optimizer steps of --batch x --accumulation packed
rows of --max-length tokens for the packed systems (tunelab's defaults: 12 steps of 4 x 1 x 512),
and as many whole steps of the seed's own batch (4 padded entries x 4 accumulated, as written)
as it takes to see as many real tokens for the seed's recipe (16 steps):

  seed     transformers Trainer, every example padded to max_length, fp32 (the seed's recipe)
  trl      TRL SFTTrainer, packing, bf16, tunelab's batch geometry
  tunelab  tunelab defaults (packing, automatic precision)

A packed row carries several entries, so a packed step of 4 x 512 tokens holds about the real
tokens of the seed's 16 padded entries (2,048 vs ~1,600): all three take a similar number of
optimizer updates on the same tokens, and the held-out losses compare the engines, not the
update counts.

Each system runs in its own child process (so peak RSS is its own), one after the other (TRL,
tunelab, then the long seed recipe), each after --cooldown seconds of idle: this machine's CPUs
slow down under sustained load (tunelab measured 551 real tokens/s after 4 minutes of matmuls
and 60 s idle, 513 straight after them), so without the pause whichever system runs later is
measured slowed. Reported:
real (non-padding) training tokens per second over the training loop, peak RSS, the held-out loss
after training (one shared evaluator: fp32, one example per forward pass, mean over tokens), the
real tokens each system had trained on by then and its optimizer steps, and tunelab's MFU against
a bf16 matmul peak measured in the same run. Needs the bench extra:
pip install 'tunelab[bench]' (trl, psutil).

With --shapes, TRL and tunelab also train models of other families at their real shapes with
random weights (speed does not depend on the weights; configs written by hand from the published
config.json of Qwen/Qwen3-0.6B and google/gemma-3-270m, nothing downloaded), on the same texts
tokenized by SmolLM2's tokenizer: one table per shape, with tunelab's MFU for each. The seed
recipe runs on SmolLM2 only.

    python benchmarks/train_throughput.py                # about 19 minutes
    python benchmarks/train_throughput.py --steps 2 --systems trl,tunelab
    python benchmarks/train_throughput.py --shapes qwen3-0.6b,gemma3-270m --systems trl,tunelab
    python benchmarks/train_throughput.py --device cuda --steps 4 --cooldown 0   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tunelab.config import FineTuningConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "computing-terms" / "data"
SYSTEMS = ("seed", "trl", "tunelab")
# the seed recipe runs last: its 10 minutes of load slowed the next system even after 60 s idle
# (tunelab 504 real tokens/s after it, 533 after TRL's 3.5 minutes)
RUN_ORDER = ("trl", "tunelab", "seed")
# the seed's TrainingArguments: batch_size 4 (its config) and gradient_accumulation_steps=4
SEED_ACCUMULATION = 4

# published config values of the real models (their config.json); smollm2 is the real weights
SHAPES: dict[str, dict | None] = {
    "smollm2": None,
    "qwen3-0.6b": {
        "model_type": "qwen3",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "attention_bias": False,
    },
    "gemma3-270m": {
        "model_type": "gemma3_text",
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "vocab_size": 262144,
        "max_position_embeddings": 32768,
        "sliding_window": 512,
        "query_pre_attn_scalar": 256,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    },
}


def build_shape(shape: str, folder: Path, tokenizer_path: str | None = None) -> str:
    """The model of ``shape``: SmolLM2's own folder, or a random model of the published shape
    saved (bf16) with SmolLM2's tokenizer (or ``tokenizer_path``'s) into ``folder``; returns
    its location."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunelab.models import resolve_model

    values = SHAPES[shape]
    if values is None:
        return resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or resolve_model(None))
    values = dict(values)
    config = AutoConfig.for_model(
        values.pop("model_type"),
        **values,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def entry_text(row: dict) -> str:
    return f"{row['term']}: {row['definition']}"


def load_texts(name: str, limit: int | None = None) -> list[str]:
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
    return [entry_text(r) for r in rows[:limit]]


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def heldout_loss(model, tokenizer, texts: list[str], max_length: int) -> float:
    """Mean next-token loss over the held-out texts, fp32, one example per forward pass."""
    import torch

    model = model.float().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            ids = torch.tensor([ids + [tokenizer.eos_token_id]], device=model.device)
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1
            total += float(out.loss) * n
            count += n
    return total / count


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=8,
        lora_alpha=32,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
    )


def token_budget(args: argparse.Namespace) -> int:
    """Real training tokens each system gets: what the packed systems fit in --steps."""
    return args.steps * args.accumulation * args.batch * args.max_length


def run_seed(args: argparse.Namespace, out: Path) -> dict:
    """The seed's recipe as written: Trainer, padding to max_length, fp32 (transformers 5 names)."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from tunelab.models import resolve_model

    location = args.model or resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(location)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32), lora_config()
    )
    # the same real-token budget as the packed systems: as many entries as it takes to reach
    # steps x batch x accumulation x max_length real tokens, in whole optimizer steps of the
    # seed's own batch (batch x 4 padded entries)
    per_step = SEED_ACCUMULATION * args.batch
    texts, real = [], 0
    for text in load_texts("train.jsonl"):
        if real >= token_budget(args) and len(texts) % per_step == 0:
            break
        texts.append(text)
        real += len(tokenizer(text, truncation=True, max_length=args.max_length)["input_ids"])
    steps = len(texts) // per_step
    data = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(
            b["text"], truncation=True, max_length=args.max_length, padding="max_length"
        ),
        batched=True,
        remove_columns=["text"],
    )
    real = int(sum(sum(m) for m in data["attention_mask"]))
    training = TrainingArguments(
        output_dir=str(out / "seed"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=SEED_ACCUMULATION,
        max_steps=steps,
        learning_rate=3e-4,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=args.device == "cpu",
        seed=42,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=training, train_dataset=data, data_collator=collator)
    seconds = trainer.train().metrics["train_runtime"]
    return {
        "real_tokens": real,
        "seconds": seconds,
        "steps": steps,
        "model": model,
        "tokenizer": tokenizer,
    }


def run_trl(args: argparse.Namespace, out: Path) -> dict:
    """TRL SFTTrainer with packing and bf16."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunelab.models import resolve_model

    location = args.model or resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(location)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    texts = load_texts("train.jsonl")
    training = SFTConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accumulation,
        max_steps=args.steps,
        learning_rate=3e-4,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=args.device == "cpu",
        bf16=True,
        packing=True,
        max_length=args.max_length,
        seed=42,
    )
    trainer = SFTTrainer(
        model=model,
        args=training,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    result = trainer.train()
    seconds = result.metrics["train_runtime"]
    # packed rows are full: every token of every row is real
    return {
        "real_tokens": token_budget(args),
        "seconds": seconds,
        "steps": args.steps,
        "model": trainer.model,
        "tokenizer": tokenizer,
    }


def run_tunelab(args: argparse.Namespace, out: Path) -> dict:
    from tunelab.api import FineTuner

    data = out / "train_text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in load_texts("train.jsonl")))
    config = FineTuningConfig(
        model_name=args.model or FineTuningConfig.model_name,
        dataset_path=str(data),
        output_dir=str(out / f"tunelab-{args.shape or 'smollm2'}"),  # one folder per shape
        lora_r=8,
        lora_alpha=32,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        learning_rate=3e-4,
        batch_size=args.batch,
        gradient_accumulation_steps=args.accumulation,
        max_length=args.max_length,
        max_steps=args.steps,
        warmup_ratio=0.0,
        logging_steps=1,
        plot=False,
        save_each_epoch=False,
        eval_each_epoch=False,
        seed=42,
    )
    tuner = FineTuner(config, device=args.device)
    results = tuner.train()
    return {
        "real_tokens": results["train_tokens"],
        "seconds": results["train_runtime_seconds"],
        "steps": results["steps"],
        "model": tuner.model,
        "tokenizer": tuner.load_tokenizer(),
    }


def matmul_peak_gflops(seconds: float = 3.0, device: str = "cpu") -> float:
    """Best bf16 matmul rate on ``device`` (the ceiling for MFU), in GFLOP/s."""
    import torch

    best = 0.0
    sizes = (1024, 2048) if device == "cpu" else (4096, 8192)
    for size in sizes:
        a, b = (
            torch.randn(size, size, dtype=torch.bfloat16, device=device),
            torch.randn(size, size, dtype=torch.bfloat16, device=device),
        )
        a @ b
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 2:
            a @ b
            count += 1
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start) / 1e9)
    return best


def child(args: argparse.Namespace) -> None:
    out = Path(args.out)
    run = {"seed": run_seed, "trl": run_trl, "tunelab": run_tunelab}[args.child]
    result = run(args, out)
    loss = heldout_loss(
        result["model"], result["tokenizer"], load_texts("heldout.jsonl", args.heldout), 512
    )
    params = sum(p.numel() for p in result["model"].parameters())
    report = {
        "system": args.child,
        "real_tokens": result["real_tokens"],
        "seconds": result["seconds"],
        "steps": result["steps"],
        "tokens_per_second": result["real_tokens"] / result["seconds"],
        "peak_rss_mb": peak_rss_mb(),
        "eval_loss": loss,
        "params": params,
    }
    (out / f"{args.child}-{args.shape}.json").write_text(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=12, help="optimizer steps of the packed systems"
    )
    parser.add_argument("--batch", type=int, default=FineTuningConfig.batch_size)
    parser.add_argument(
        "--accumulation",
        type=int,
        default=FineTuningConfig.gradient_accumulation_steps,
        help="micro-batches per step of the packed systems (the seed recipe keeps its 4)",
    )
    parser.add_argument("--max-length", type=int, default=FineTuningConfig.max_length)
    parser.add_argument(
        "--heldout", type=int, default=40, help="held-out entries for the eval loss"
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument(
        "--shapes",
        default="smollm2",
        help=f"models to train, comma-separated: {', '.join(SHAPES)} (the seed recipe runs "
        "on smollm2 only)",
    )
    parser.add_argument(
        "--cooldown",
        type=float,
        default=60.0,
        help="idle seconds before each system and the matmul peak (0: none)",
    )
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--tokenizer", help="tokenizer folder for the random shapes (default: SmolLM2's)"
    )
    parser.add_argument("--shape", default="smollm2", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    chosen = {s for s in args.systems.split(",") if s}
    if chosen - set(SYSTEMS):
        parser.error(f"--systems: unknown {sorted(chosen - set(SYSTEMS))}; choose from {SYSTEMS}")
    shapes = [s for s in args.shapes.split(",") if s]
    if set(shapes) - set(SHAPES):
        parser.error(f"--shapes: unknown {sorted(set(shapes) - set(SHAPES))}; choose from {SHAPES}")
    systems = [s for s in RUN_ORDER if s in chosen]
    reports: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        for shape in shapes:
            location = build_shape(shape, Path(out) / shape, args.tokenizer)
            reports[shape] = {}
            for system in systems:
                if system == "seed" and shape != "smollm2":
                    continue  # the seed recipe's model is SmolLM2
                command = [sys.executable, __file__, "--child", system, "--out", out]
                command += ["--model", location, "--shape", shape]
                command += ["--steps", str(args.steps), "--batch", str(args.batch)]
                command += ["--accumulation", str(args.accumulation)]
                command += ["--max-length", str(args.max_length), "--heldout", str(args.heldout)]
                command += ["--device", args.device]
                time.sleep(args.cooldown)
                print(f"running {system} on {shape} ...", flush=True)
                subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
                report = Path(out) / f"{system}-{shape}.json"
                reports[shape][system] = json.loads(report.read_text())
    time.sleep(args.cooldown)
    peak = matmul_peak_gflops(device=args.device)
    print(
        f"\n{token_budget(args):,} real training tokens each ({args.steps} packed steps of "
        f"{args.batch}x{args.accumulation}x{args.max_length}); "
        f"bf16 matmul peak here {peak:.0f} GFLOP/s"
    )
    for shape, shape_reports in reports.items():
        print_table(shape, shape_reports, peak)


def print_table(shape: str, reports: dict[str, dict], peak: float) -> None:
    """One shape's table, tunelab's MFU and its ratios to the other systems."""
    base = reports.get("tunelab")
    print(f"\n{shape}\n")
    print(
        "| system | real tokens/s | vs tunelab | real tokens trained | optimizer steps "
        "| peak RSS MiB | held-out loss |"
    )
    print("|---|---|---|---|---|---|---|")
    reports = {system: reports[system] for system in SYSTEMS if system in reports}
    for system, r in reports.items():
        ratio = f"{r['tokens_per_second'] / base['tokens_per_second']:.3f}x" if base else "-"
        print(
            f"| {system} | {r['tokens_per_second']:.1f} | {ratio} | {r['real_tokens']:,} | "
            f"{r['steps']} | {r['peak_rss_mb']:.0f} | {r['eval_loss']:.4f} |"
        )
    if base:
        # frozen base: forward 2N and input-gradient 2N FLOPs per token (no weight gradients)
        achieved = 4 * base["params"] * base["tokens_per_second"] / 1e9
        print(
            f"\ntunelab: ~{achieved:.0f} GFLOP/s of model matmuls (4N per token), "
            f"MFU {achieved / peak:.1%} of the measured bf16 matmul peak"
        )
        for system, r in reports.items():
            if system != "tunelab":
                speed = base["tokens_per_second"] / r["tokens_per_second"]
                print(
                    f"tunelab vs {system}: {speed:.2f}x the real tokens/s, held-out loss "
                    f"{(base['eval_loss'] / r['eval_loss'] - 1):+.2%}, peak RSS "
                    f"{base['peak_rss_mb'] / r['peak_rss_mb']:.2f}x"
                )


if __name__ == "__main__":
    main()
