"""The family matrix: tunelab's training on every mainstream model family equals transformers.

For each family, a tiny random model (width 64, 2 layers, 4 query / 2 key-value heads, the
shared test tokenizer) with the config values that matter switched on (short sliding windows,
soft-capping, logit scaling, multipliers), LoRA on the family's attention projections:

- packed training loss and LoRA gradients (tunelab's ``training_mode`` and
  ``causal_lm_loss_sum`` on packed rows) equal the stock transformers model run on each packed
  example alone, to 1e-5 in fp32, and the pieces that run fast are the ones the matrix names;
- a short bf16 run trains (loss falls);
- greedy generation of the trained adapter (tunelab's ``load_for_inference``) equals plain
  transformers + peft, and the merged model (``merge_run``) equals the adapter;
- the default target_modules become the family's attention projections where the family has
  no q_proj / v_proj.

A new family is one line in CASES. TUNELAB_TEST_DEVICE=cuda runs the matrix on a GPU
(benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tunelab.config import FineTuningConfig
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.training.batching import Row, collate

DEVICE = os.environ.get("TUNELAB_TEST_DEVICE", "cpu")


@dataclass
class Case:
    """One family: its model_type, the config values that matter, the pieces expected to run
    stock (dropout is 0 in the equality check, so it is stock there), and its LoRA targets."""

    model_type: str
    quirks: dict[str, Any] = field(default_factory=dict)
    stock: set[str] = field(default_factory=set)
    targets: tuple[str, ...] = ("q_proj", "v_proj")


WINDOW = 6  # shorter than every packed example below, so the window matters
CASES = [
    Case("llama"),
    Case("mistral", {"sliding_window": WINDOW}),
    Case("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    Case("qwen3"),
    Case(
        "qwen3_moe",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    ),
    Case(
        "qwen2_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
    ),
    Case("gemma", {"head_dim": 16}),
    Case(
        "gemma2",
        {
            "head_dim": 16,
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 1.0,
            "query_pre_attn_scalar": 16,
        },
    ),
    Case(
        "gemma3_text",
        {
            "head_dim": 16,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "final_logit_softcapping": 1.0,
            "query_pre_attn_scalar": 16,
        },
    ),
    Case("phi3", {"sliding_window": WINDOW}, stock={"rotary"}, targets=("qkv_proj",)),
    Case("olmo2", stock={"rotary", "norm"}),
    Case(
        "granite",
        {
            "logits_scaling": 4.0,
            "attention_multiplier": 0.2,
            "residual_multiplier": 0.5,
            "embedding_multiplier": 3.0,
        },
    ),
    Case("cohere", {"logit_scale": 0.25}, stock={"rotary", "norm"}),
    Case("stablelm", {"use_qkv_bias": True}, stock={"rotary", "norm"}),
    Case("smollm3"),
    Case("gpt_neox", {"rotary_pct": 0.5}, stock={"rotary", "norm"}, targets=("query_key_value",)),
    Case("gpt2", stock={"attention", "rotary", "norm", "lora_forward"}, targets=("c_attn",)),
]
IDS = [case.model_type for case in CASES]

TEXTS = [
    "A compiler translates source code into machine code before the program runs.",
    "An interpreter runs a program statement by statement.",
    "A hash table maps keys to values through a hash function.",
    "Recursion is a function calling itself on a smaller input.",
    "A linked list stores each element with a pointer to the next one in memory.",
    "Caching keeps recent results close to where they are needed.",
]


def _config(case: Case, tokenizer: Any) -> Any:
    from transformers import AutoConfig

    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        # logits of a few units, as in trained models: soft-caps and scales then matter
        "initializer_range": 0.2,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.eos_token_id,
    }
    if case.model_type == "gpt2":
        common = {
            "vocab_size": len(tokenizer),
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 256,
            "initializer_range": 0.2,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    return AutoConfig.for_model(case.model_type, **common, **case.quirks)


@dataclass
class Built:
    case: Case
    base_dir: Path
    tokenizer: Any
    rows: list[Row]
    examples: list[tuple[list[int], list[int]]]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from tunelab.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def built(request, tokenizer, tmp_path_factory) -> Built:
    """The family's tiny random base model saved to a folder, and packed rows of TEXTS."""
    from transformers import AutoModelForCausalLM

    case = request.param
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(case, tokenizer))
    # random norms and biases: a family's (1 + weight) or bias handling must show
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "bias" in name or "ln" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    base_dir = tmp_path_factory.mktemp(case.model_type) / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    examples = []
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:24]
        labels = [IGNORE_INDEX] + ids[1:]
        examples.append((ids, labels))
    rows = [_pack(examples[:3]), _pack(examples[3:])]
    return Built(case, base_dir, tokenizer, rows, examples)


def _pack(examples: list[tuple[list[int], list[int]]]) -> Row:
    row = Row([], [], [])
    for ids, labels in examples:
        row.input_ids += ids
        row.labels += labels
        row.position_ids += list(range(len(ids)))
    return row


def _load(built: Built, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        built.base_dir, dtype=dtype, **_reference_attention(built.case)
    ).to(DEVICE)


def _reference_attention(case: Case) -> dict[str, str]:
    # transformers' eager attention is its reference where attention is soft-capped: its SDPA
    # attention has no soft-capping, and transformers 5.2 picks SDPA for Gemma 2 by default
    return {"attn_implementation": "eager"} if case.quirks.get("attn_logit_softcapping") else {}


def _with_lora(model: Any, case: Case, dropout: float = 0.0) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(case.targets))
    model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():  # an active adapter: B is zero at initialisation
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return model


def _lora_grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "stock"])
def test_packed_loss_and_gradients_equal_stock_transformers(built, fast_path):
    """With the fast path, and without it (every piece stock: transformers must keep each
    packed example to itself from the restarting position ids)."""
    from tunelab.training.loop import training_mode
    from tunelab.training.loss import causal_lm_loss_sum

    model = _with_lora(_load(built), built.case)
    stock_loss = torch.zeros(())
    for ids, labels in built.examples:
        logits = model(input_ids=torch.tensor([ids], device=DEVICE), use_cache=False).logits
        stock_loss = stock_loss + F.cross_entropy(
            logits[0, :-1].float().cpu(), torch.tensor(labels[1:]), reduction="sum"
        )
    stock_loss.backward()
    expected = _lora_grads(model)
    model.zero_grad(set_to_none=True)

    config = FineTuningConfig(lora_dropout=0.0, fast_path=fast_path)
    with training_mode(model, config) as plan:
        batch = collate(built.rows, built.tokenizer.pad_token_id)
        loss, count = causal_lm_loss_sum(model, {k: v.to(DEVICE) for k, v in batch.items()})
        loss.backward()
    got = _lora_grads(model)

    assert count == sum(len(ids) - 1 for ids, _ in built.examples)
    stock = {piece for piece, fast in plan.fast.items() if not fast}
    expected_stock = built.case.stock | {"dropout"} if fast_path else set(plan.fast)
    assert stock == expected_stock, plan.summary()
    torch.testing.assert_close(loss.cpu(), stock_loss, rtol=1e-5, atol=0)
    assert got.keys() == expected.keys() and got
    for name, gradient in expected.items():
        worst = float((got[name] - gradient).abs().max() / gradient.abs().max())
        assert worst < 1e-5, f"{name}: max relative difference {worst:.2e}"


def test_bf16_run_trains_then_generates_and_merges_like_peft(built, tmp_path):
    from peft import PeftModel

    from tunelab.generation import generate_from_text, load_for_inference
    from tunelab.shipping.merge import merge_run
    from tunelab.training.loop import accumulate_gradients, training_mode

    model = _with_lora(_load(built), built.case, dropout=0.05)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    config = FineTuningConfig(lora_dropout=0.05)
    pad = built.tokenizer.pad_token_id
    losses = []
    with training_mode(model, config):
        model.train()
        for _ in range(8):
            loss, _ = accumulate_gradients(model, [built.rows], pad, DEVICE, precision="bf16")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
    # random tiny models start near log(vocab) (soft-capped ones can move little): a working
    # run takes a few hundredths off in 8 steps, a broken gradient does not
    assert losses[-1] < losses[0] - 0.02, losses
    model.eval()

    run_dir = tmp_path / "run"
    model.save_pretrained(run_dir)
    built.tokenizer.save_pretrained(run_dir)
    prompt = "A compiler translates"
    loaded = load_for_inference(str(run_dir), device=DEVICE)
    ours = generate_from_text(loaded, [prompt], max_new_tokens=8)[0]

    plain = PeftModel.from_pretrained(_load(built), str(run_dir)).eval()
    ids = built.tokenizer(prompt, return_tensors="pt").to(DEVICE)
    out = plain.generate(**ids, max_new_tokens=8, do_sample=False)
    theirs = built.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert ours == theirs.strip()  # tunelab trims the answer's surrounding whitespace

    merged_dir = merge_run(run_dir, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(
        merged_dir, **_reference_attention(built.case)
    ).eval()
    tokens = torch.tensor([built.rows[0].input_ids])
    with torch.no_grad():
        expected = plain(input_ids=tokens.to(DEVICE)).logits.cpu()
        torch.testing.assert_close(merged(input_ids=tokens).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "case", [c for c in CASES if "q_proj" not in c.targets], ids=lambda c: c.model_type
)
def test_default_target_modules_become_the_family_attention_projections(case, tokenizer):
    from tunelab.methods import check_target_modules, family_target_modules
    from tunelab.models import model_modules

    modules = model_modules(_config(case, tokenizer))
    config = FineTuningConfig(model_name="family")
    assert config.target_modules == ["q_proj", "v_proj"]
    targets, note = family_target_modules(config, case.model_type, modules)
    assert targets == list(case.targets)
    config = dataclasses.replace(config, target_modules=targets)  # the config is frozen
    assert f"{case.model_type} has no q_proj/v_proj" in note
    check_target_modules(config, modules)  # the chosen ones exist and take an adapter


def test_attention_softcapping_loads_with_the_attention_that_applies_it(built):
    """tunelab's loaded model computes the checkpoint's model: where attention is soft-capped,
    transformers' SDPA attention (which 5.2 picks for Gemma 2) would drop the cap."""
    from tunelab.models import load_model

    model = load_model(str(built.base_dir), torch.float32, device=DEVICE)
    ids = torch.tensor([built.examples[0][0]], device=DEVICE)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
        expected = _load(built)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if built.case.quirks.get("attn_logit_softcapping"):
        assert model.config._attn_implementation == "eager"
