"""Every method trains for real, saves, and reloads to identical outputs."""

import json
import math

import pytest
import torch

from tunelab.api import FineTuner
from tunelab.config import FineTuningConfig
from tunelab.errors import TunelabError
from tunelab.generation import load_for_inference
from tunelab.methods import check_target_modules
from tunelab.models import load_model_config, model_modules

METHODS = ["lora", "dora", "qlora", "ia3", "adalora", "prompt_tuning", "prefix_tuning", "full"]
EXPECTED_TRAINABLE = {  # on the tiny model: 2 layers, width 64, kv width 32, vocab 384
    "lora": 2 * (8 * (64 + 64) + 8 * (64 + 32)),
    "dora": 2 * (8 * (64 + 64) + 8 * (64 + 32) + 64 + 32),
    "qlora": 2 * (8 * (64 + 64) + 8 * (64 + 32)),
    "ia3": 2 * (64 + 32),
    "prompt_tuning": 20 * 64,
    "prefix_tuning": 20 * 2 * 2 * 32,
}


def logits_of(model, tokenizer):
    ids = tokenizer("What does byte mean?", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits[:, -1]


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_saves_and_reloads(method, make_config, tmp_path, capsys):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    lr = {"ia3": 5e-2, "prompt_tuning": 5e-2, "prefix_tuning": 5e-2, "adalora": 2e-2}
    config = make_config(
        method=method,
        max_steps=8,
        learning_rate=lr.get(method, 1e-2),
        eval_path=str(tmp_path / "train.jsonl"),
        gradient_accumulation_steps=1,
        batch_size=4,
    )
    tuner = FineTuner(config)
    results = tuner.train()
    printed = capsys.readouterr().out
    assert f"Trainable parameters: {results['trainable_parameters']:,}" in printed
    if method in EXPECTED_TRAINABLE:
        assert results["trainable_parameters"] == EXPECTED_TRAINABLE[method]
    assert results["method"] == method and results["peak_memory_mb"] > 100
    assert results["eval_loss"] < results["initial_eval_loss"] - 1e-3  # a real step that learns
    reloaded = load_for_inference(config.output_dir)
    torch.testing.assert_close(
        logits_of(reloaded.model, reloaded.tokenizer),
        logits_of(tuner.model.eval(), tuner.tokenizer),
        atol=1e-4,
        rtol=0,
    )


def test_rslora_patterns_regex_and_trainable_head(make_config, tiny_model_dir):
    config = make_config(
        use_rslora=True,
        rank_pattern={"v_proj": 4},
        alpha_pattern={"v_proj": 8},
        train_lm_head=True,
        max_steps=1,
    )
    tuner = FineTuner(config)
    tuner.train()
    with open(config.output_dir + "/adapter_config.json") as file:
        saved = json.load(file)
    assert saved["use_rslora"] is True and saved["rank_pattern"] == {"v_proj": 4}
    assert saved["modules_to_save"] == ["lm_head"]
    names = model_modules(load_model_config(str(tiny_model_dir)))
    check_target_modules(FineTuningConfig(target_modules=["re:.*\\.(q|v)_proj"]), names)
    with pytest.raises(TunelabError, match=r"regex '.*x_proj' matches no module"):
        check_target_modules(FineTuningConfig(target_modules=["re:.*\\.x_proj"]), names)
    with pytest.raises(TunelabError, match=r"does not compile"):
        check_target_modules(FineTuningConfig(target_modules=["re:(("]), names)
    with pytest.raises(
        TunelabError, match=r"'rank_pattern' names 'w_proj', which matches no adaptable"
    ):
        check_target_modules(FineTuningConfig(rank_pattern={"w_proj": 4}), names)


def test_new_tokens_resize_the_embeddings(make_config):
    with pytest.raises(TunelabError, match="set train_embeddings: true"):
        make_config(add_tokens=["<term>"])
    config = make_config(
        add_tokens=["<term>"], train_embeddings=True, train_lm_head=True, max_steps=2
    )
    tuner = FineTuner(config)
    tuner.train()
    assert len(tuner.tokenizer) == 385
    reloaded = load_for_inference(config.output_dir)
    assert reloaded.model.get_input_embeddings().weight.shape[0] == 385
    torch.testing.assert_close(
        logits_of(reloaded.model, reloaded.tokenizer),
        logits_of(tuner.model.eval(), tuner.tokenizer),
        atol=1e-4,
        rtol=0,
    )


def test_qlora_without_bitsandbytes_says_how_to_install(make_config, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(TunelabError, match=r"needs bitsandbytes.*pip install"):
        FineTuner(make_config(method="qlora")).prepare_model()


def test_config_rejects_bad_method_values():
    with pytest.raises(TunelabError, match=r"'method' is 'lorra'.*Did you mean 'lora'"):
        FineTuningConfig(method="lorra")
    with pytest.raises(TunelabError, match=r"'quantization_bits' is 3, but it must be 4 or 8"):
        FineTuningConfig(quantization_bits=3)
    with pytest.raises(TunelabError, match=r"'rank_pattern.v_proj' is 'x'"):
        FineTuningConfig(rank_pattern={"v_proj": "x"})


def test_full_fine_tuning_under_bf16_autocast(make_config):
    # fp32 weights with bf16 compute: packed attention must keep SDPA's output dtype
    results = FineTuner(make_config(method="full", precision="bf16", max_steps=3)).train()
    assert results["precision"] == "bf16" and results["final_train_loss"] < 6.5


@pytest.mark.parametrize("method", ["ia3", "dora", "adalora", "prompt_tuning"])
def test_methods_train_under_bf16_autocast(make_config, method):
    """The default precision on a bf16 CPU: every adapter family must train there (IA3's layers
    lack PEFT's input-casting switch, which once made them fail under bf16)."""
    results = FineTuner(make_config(method=method, precision="bf16", max_steps=3)).train()
    assert results["precision"] == "bf16" and results["steps"] == 3
    assert math.isfinite(results["final_train_loss"]) and results["final_train_loss"] < 6.5


def test_gradient_checkpointing_under_bf16(make_config):
    # checkpointed layers recompute in backward, where PEFT's input casting must stay off too
    results = FineTuner(
        make_config(precision="bf16", gradient_checkpointing=True, max_steps=2)
    ).train()
    assert results["steps"] == 2 and results["final_train_loss"] < 6.5


def test_only_layers_an_adapter_can_wrap_are_accepted_or_suggested(tiny_model_dir):
    modules = model_modules(load_model_config(str(tiny_model_dir)))

    def refusal(targets, method="lora"):
        config = FineTuningConfig(target_modules=targets, method=method, lora_r=4)
        with pytest.raises(TunelabError) as error:
            check_target_modules(config, modules)
        return str(error.value)

    assert (
        "'self_attn': self_attn is an attention block (LlamaAttention), not a layer an adapter "
        "can wrap; its layers are k_proj, o_proj, q_proj, v_proj." in refusal(["self_attn"])
    )
    assert "mlp is a feed-forward block (LlamaMLP)" in refusal(["q_proj", "mlp"])
    assert "its layers are down_proj, gate_proj, up_proj" in refusal(["mlp"])
    assert "k_proj, o_proj, q_proj, v_proj" in refusal(["re:.*\\.1\\.self_attn"])
    # the suggestions for a missing name are layers, never a block
    missing = refusal(["c_attn"])
    assert "'c_attn', which the model" in missing and "self_attn" not in missing
    assert "embed_tokens is a Embedding layer, which a adalora adapter cannot wrap" in refusal(
        ["embed_tokens"], "adalora"
    )
    # what PEFT accepts is accepted: a dotted name (matched by its end), an embedding for LoRA
    for targets in (["self_attn.q_proj"], ["embed_tokens", "v_proj"], ["re:.*\\.1\\..*q_proj"]):
        check_target_modules(FineTuningConfig(target_modules=targets), modules)


def test_gpt2s_conv1d_layers_take_adapters_and_its_attention_block_does_not():
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    modules = model_modules(config)
    check_target_modules(FineTuningConfig(target_modules=["c_attn"]), modules)
    with pytest.raises(TunelabError, match=r"attn is an attention block \(GPT2Attention\).*"
                       r"its layers are c_attn, c_proj"):  # fmt: skip
        check_target_modules(FineTuningConfig(target_modules=["attn"]), modules)


def test_a_block_in_target_modules_fails_before_the_model_loads(make_config):
    tuner = FineTuner(make_config(target_modules=["self_attn"], max_steps=1))
    with pytest.raises(TunelabError, match="self_attn is an attention block"):
        tuner.train()
    assert tuner.model is None
