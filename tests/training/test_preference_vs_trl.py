"""Each preference objective's loss and gradient on a fixed batch equal TRL's (fp32, 1e-5).

DPO, IPO and KTO run TRL's own trainers' loss step (``_compute_loss``) on TRL's collated
batch; ORPO and SimPO use TRL's loss functions (``odds_ratio_loss``, ``cpo_loss``) and its
``get_batch_logps`` on a plain padded forward. tunelab gets the same token sequences, packed
together in one row (chosen and rejected side by side), and its own forward and reference.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import preference_pairs, write_jsonl

from tunelab.config import FineTuningConfig
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.training.objectives import Settings
from tunelab.training.preference import (
    StepStats,
    Unit,
    attach_reference_logps,
    chosen_tokens,
    count_units,
    pack_units,
    preference_loss,
)

trl = pytest.importorskip("trl")

PAIRS = [
    {"prompt": "what is a cache", "chosen": " a fast store", "rejected": " a slow disk thing"},
    {"prompt": "name a bus", "chosen": " the data bus", "rejected": " red"},
    {"prompt": "define a loop", "chosen": " code that repeats", "rejected": " a circle of rope"},
]


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
        init_lora_weights=False,
    )  # fmt: skip


def _base_model(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _perturb(model) -> None:
    """An adapter far from the identity, so the policy and its reference (the base) differ."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def _lora_model(folder: Path) -> torch.nn.Module:
    from peft import get_peft_model

    model = get_peft_model(_base_model(folder), _lora_config())
    _perturb(model)
    return model


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def _example(input_ids, attention_mask, completion_mask) -> TokenizedExample:
    keep = attention_mask.bool()
    ids = input_ids[keep].tolist()
    answer = completion_mask[keep].tolist()
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, answer, strict=True)]
    return TokenizedExample(ids, labels)


def _lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _run_ours(model, units, settings, tmp_path) -> tuple[float, dict[str, torch.Tensor]]:
    rows = pack_units(units, 512)
    assert len(rows) == 1
    attach_reference_logps(model, [rows], tmp_path / "reference.json", 0, 4)
    model.train()
    loss = preference_loss(
        model, rows, settings, 0, "cpu", count_units(rows), chosen_tokens(rows), StepStats()
    )
    loss.backward()
    return float(loss), _lora_grads(model)


def _assert_close(ours, theirs):
    loss, grads = ours
    their_loss, their_grads = theirs
    assert loss == pytest.approx(their_loss, abs=1e-5)
    assert grads.keys() == their_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], their_grads[name], atol=1e-5, rtol=1e-4)


def _dpo_trainer(folder, model, tmp_path, loss_type):
    from datasets import Dataset

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=3,
        beta=0.2, use_cpu=True, bf16=False, max_length=64, loss_type=[loss_type],
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
        processing_class=_tokenizer(folder), peft_config=_lora_config(),
    )  # fmt: skip
    _perturb(trainer.model)
    return trainer


@pytest.mark.parametrize("objective", ["dpo", "ipo"])
def test_dpo_and_ipo_match_trl(tiny_model_dir, tmp_path, objective):
    model = _base_model(tiny_model_dir)
    loss_type = "sigmoid" if objective == "dpo" else "ipo"
    trainer = _dpo_trainer(tiny_model_dir, model, tmp_path, loss_type)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    trainer.model.train()
    their_loss = trainer._compute_loss(trainer.model, batch, False)
    their_loss.backward()
    theirs = (float(their_loss.detach()), _lora_grads(trainer.model))

    n = len(PAIRS)
    examples = [
        _example(batch["input_ids"][i], batch["attention_mask"][i], batch["completion_mask"][i])
        for i in range(2 * n)
    ]
    units = [Unit(i, {"chosen": examples[i], "rejected": examples[n + i]}) for i in range(n)]
    ours = _run_ours(trainer.model, units, Settings(objective, beta=0.2), tmp_path)
    _assert_close(ours, theirs)


def _padded_forward_logps(model, examples, average):
    """TRL's get_batch_logps on a plain right-padded forward of ``examples``."""
    from trl.experimental.cpo import CPOTrainer

    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
    # the chosen answers' mean NLL over their tokens, as CPOTrainer's cross_entropy_loss
    half = len(examples) // 2
    nll = torch.nn.functional.cross_entropy(
        logits[:half, :-1].reshape(-1, logits.shape[-1]), labels[:half, 1:].reshape(-1)
    )
    return logps, nll


def _pair_examples(tokenizer) -> list[TokenizedExample]:
    chosen, rejected = [], []
    for pair in PAIRS:
        prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
        for side, out in (("chosen", chosen), ("rejected", rejected)):
            answer = tokenizer(pair[side], add_special_tokens=False)["input_ids"]
            answer = answer + [tokenizer.eos_token_id]
            out.append(TokenizedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return chosen + rejected


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_orpo_and_simpo_match_trl(tiny_model_dir, tmp_path, objective):
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    model = _lora_model(tiny_model_dir)
    examples = _pair_examples(_tokenizer(tiny_model_dir))
    n = len(PAIRS)
    model.train()
    logps, nll = _padded_forward_logps(model, examples, average=True)
    fake = SimpleNamespace(
        beta=0.2, accelerator=SimpleNamespace(device="cpu"), alpha=0.0, loss_type="simpo",
        simpo_gamma=0.7, label_smoothing=0.1,
    )  # fmt: skip
    if objective == "orpo":
        losses = ORPOTrainer.odds_ratio_loss(fake, logps[:n], logps[n:])[0]
        their_loss = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
        settings = Settings("orpo", beta=0.2)
    else:
        losses = CPOTrainer.cpo_loss(fake, logps[:n], logps[n:])[0]
        their_loss = losses.mean() + 0.5 * nll  # cpo_alpha 0.5
        settings = Settings("simpo", beta=0.2, simpo_gamma=0.7, label_smoothing=0.1, cpo_alpha=0.5)
    their_loss.backward()
    theirs = (float(their_loss.detach()), _lora_grads(model))

    units = [Unit(i, {"chosen": examples[i], "rejected": examples[n + i]}) for i in range(n)]
    _assert_close(_run_ours(model, units, settings, tmp_path), theirs)


def test_kto_matches_trl(tiny_model_dir, tmp_path):
    from datasets import Dataset

    model = _base_model(tiny_model_dir)
    rows = [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in PAIRS
        for side in ("chosen", "rejected")
    ]
    args = trl.KTOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=len(rows),
        beta=0.2, use_cpu=True, bf16=False, max_length=64, desirable_weight=1.5,
        undesirable_weight=0.7,
    )  # fmt: skip
    trainer = trl.KTOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=_tokenizer(tiny_model_dir), peft_config=_lora_config(),
    )  # fmt: skip
    _perturb(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    their_loss = trainer._compute_loss(trainer.model, batch, False)
    their_loss.backward()
    theirs = (float(their_loss.detach()), _lora_grads(trainer.model))

    units = []
    for i in range(len(rows)):
        completion = _example(
            batch["input_ids"][i], batch["attention_mask"][i], batch["completion_mask"][i]
        )
        kl = _example(
            batch["KL_input_ids"][i], batch["KL_attention_mask"][i],
            batch["KL_completion_mask"][i],
        )  # fmt: skip
        units.append(
            Unit(i, {"completion": completion, "kl": kl}, desirable=bool(batch["label"][i]))
        )
    settings = Settings("kto", beta=0.2, desirable_weight=1.5, undesirable_weight=0.7)
    _assert_close(_run_ours(trainer.model, units, settings, tmp_path), theirs)


def test_config_picks_the_objective_with_its_settings():
    config = FineTuningConfig(objective="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0)
    assert (config.objective, config.beta, config.simpo_gamma) == ("simpo", 2.0, 1.0)


@pytest.mark.parametrize(("batch_size", "accumulation"), [(4, 1), (2, 2)])
def test_dpo_training_follows_trls_dpo_trainer(
    tiny_model_dir, tmp_path, monkeypatch, batch_size, accumulation
):
    """Three optimizer steps of tunelab's DPO and TRL's DPOTrainer from the same adapter, on
    the same four pairs (all of them in each step, so the order cannot differ) with the same
    rate, schedule, clipping and AdamW: the same loss, gradient norm and rate at each step and
    the same adapter at the end. The prompts end in a newline, which the data stage once
    stripped: the same loss on a fixed batch, but not the same text trained on."""
    import json

    from datasets import Dataset

    import tunelab.api
    from tunelab.api import FineTuner
    from tunelab.config import FineTuningConfig

    pairs = preference_pairs("What does {} mean?\n", 4)
    steps, learning_rate, beta = 3, 5e-3, 0.1
    from peft import LoraConfig

    lora = {"lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, seed=42,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=learning_rate, beta=beta, max_length=64,
        logging_steps=1, save_strategy="no", gradient_checkpointing=False,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=_base_model(tiny_model_dir), args=args, train_dataset=Dataset.from_list(pairs),
        processing_class=_tokenizer(tiny_model_dir),
        peft_config=LoraConfig(task_type="CAUSAL_LM", r=4, **lora),
    )  # fmt: skip
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]

    def same_initial_adapter(*args, **kwargs):
        model = apply_method(*args, **kwargs)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(initial[name])
        return model

    apply_method = tunelab.api.apply_method
    monkeypatch.setattr(tunelab.api, "apply_method", same_initial_adapter)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    config = FineTuningConfig(
        model_name=str(tiny_model_dir), dataset_path=str(data), output_dir=str(tmp_path / "ours"),
        objective="dpo", beta=beta, learning_rate=learning_rate, batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=steps, warmup_ratio=0.0,
        max_length=64, chat_format="plain", precision="fp32", packing=False, logging_steps=1,
        plot=False, save_each_epoch=False, eval_each_epoch=False, seed=42,
        dedup_near_threshold=None, lora_r=4, **lora,
    )  # fmt: skip
    tuner = FineTuner(config)
    tuner.train()
    ours = [
        record
        for record in map(
            json.loads, (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()
        )
        if "loss" in record
    ]
    assert len(ours) == len(theirs) == steps
    for mine, their in zip(ours, theirs, strict=True):
        assert mine["loss"] == pytest.approx(their["loss"], abs=1e-5)
        assert mine["grad_norm"] == pytest.approx(their["grad_norm"], abs=1e-5)
        assert mine["lr"] == pytest.approx(their["learning_rate"], rel=1e-6)
        assert mine["rewards/margins"] == pytest.approx(their["rewards/margins"], abs=1e-5)
    trained = {n: p.detach() for n, p in tuner.model.named_parameters() if "lora_" in n}
    assert trained.keys() == initial.keys()
    for name, weight in trained.items():
        assert not torch.equal(weight, initial[name])  # every adapter matrix learned
        torch.testing.assert_close(weight, trainer.model.state_dict()[name], atol=1e-5, rtol=1e-4)
