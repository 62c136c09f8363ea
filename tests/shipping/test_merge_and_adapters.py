"""Merging adapters into the base, and several adapters on one base."""

import subprocess
import sys

import pytest
import torch

from tunelab.api import FineTuner
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.generation import generate, load_for_inference
from tunelab.shipping.adapters import AdapterSet, describe, format_table
from tunelab.shipping.merge import merge_run


def train(make_config, tmp_path, name, **overrides):
    values = dict(max_steps=6, learning_rate=1e-2, output_dir=str(tmp_path / name))
    values.update(overrides)
    FineTuner(make_config(**values)).train()
    return tmp_path / name


def last_logits(model, tokenizer, text="What does byte mean?"):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits[:, -1]


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "qlora"])
def test_merged_model_matches_the_adapter(method, make_config, tmp_path):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    run = train(
        make_config,
        tmp_path,
        method,
        method=method,
        target_modules=["all-linear"] if method != "ia3" else ["k_proj", "v_proj", "down_proj"],
    )
    merged = merge_run(run, tmp_path / "merged")
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "chat_template.jinja",
        "run_info.json",
    ):
        assert (merged / name).is_file(), name
    # plain transformers loads it, in a process without tunelab
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "ids = t('What does byte mean?', return_tensors='pt', add_special_tokens=False);"
        "torch.save(m(**ids).logits[:, -1].detach(), sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", script, str(merged), str(tmp_path / "l.pt")], check=True)
    plain = torch.load(tmp_path / "l.pt", weights_only=True)
    if method == "qlora":
        # a QLoRA adapter merges into the full-precision base it was quantised from: the merge
        # is exact against that base with the adapter on top
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(make_config().model_name)
        unmerged = PeftModel.from_pretrained(base, str(run)).eval()
        expected = last_logits(unmerged, AutoTokenizer.from_pretrained(str(run)))
        torch.testing.assert_close(plain, expected, atol=1e-4, rtol=0)
        return
    adapter = load_for_inference(str(run))
    torch.testing.assert_close(
        plain, last_logits(adapter.model, adapter.tokenizer), atol=1e-4, rtol=0
    )
    loaded = load_for_inference(str(merged))
    assert loaded.chat and generate(loaded, ["hi"], max_new_tokens=5) == generate(
        adapter, ["hi"], max_new_tokens=5
    )


def test_merge_errors(make_config, tmp_path):
    prompt_run = train(make_config, tmp_path, "prompt", method="prompt_tuning", max_steps=1)
    with pytest.raises(TunelabError, match="adds virtual tokens instead of changing weights"):
        merge_run(prompt_run, tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="has no adapter_config.json"):
        merge_run(tmp_path / "empty", tmp_path / "m")
    full_run = train(make_config, tmp_path, "full", method="full", max_steps=1)
    with pytest.raises(TunelabError, match="holds a full model already"):
        merge_run(full_run, tmp_path / "m")
    lora_run = train(make_config, tmp_path, "lora", max_steps=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(TunelabError, match="busy is not empty"):
        merge_run(lora_run, tmp_path / "busy")
    # --overwrite replaces only what tunelab wrote: a folder of the user's is kept (#17)
    assert main(["merge", str(lora_run), str(tmp_path / "busy"), "--overwrite"]) == 2
    assert (tmp_path / "busy" / "x").read_text() == "x"


def test_adapters_side_by_side_switch_and_combine(make_config, tmp_path, capsys):
    a = train(make_config, tmp_path, "a", seed=1, target_modules=["all-linear"])
    b = train(make_config, tmp_path, "b", seed=2, lora_r=4, target_modules=["q_proj"])
    table = format_table([describe(a), describe(b)])
    assert table.splitlines()[0].split()[:3] == ["name", "method", "r"]
    assert "lora" in table and " 4 " in table
    adapters = AdapterSet({"a": a, "b": b})
    assert adapters.names == ["a", "b"]
    alone_a = load_for_inference(str(a))
    expected_a = last_logits(alone_a.model, alone_a.tokenizer)
    adapters.use("a")
    torch.testing.assert_close(
        last_logits(adapters.model, adapters.tokenizer), expected_a, atol=1e-4, rtol=0
    )
    adapters.use("b")
    assert not torch.allclose(last_logits(adapters.model, adapters.tokenizer), expected_a)
    adapters.combine({"a": 1.0, "b": 0.0}, name="only_a")
    torch.testing.assert_close(
        last_logits(adapters.model, adapters.tokenizer), expected_a, atol=1e-4, rtol=0
    )
    with pytest.raises(TunelabError, match="'half' cannot name an adapter"):
        adapters.combine({"a": 0.5, "b": 0.5}, name="half")
    adapters.combine({"a": 0.5, "b": 0.5}, name="mix")
    half = last_logits(adapters.model, adapters.tokenizer)
    assert not torch.allclose(half, expected_a, atol=1e-4)
    with pytest.raises(TunelabError, match=r"no adapter named 'c'; loaded: a, b"):
        adapters.use("c")
    with pytest.raises(TunelabError, match="weights must be >= 0"):
        adapters.combine({"a": -1.0})
    assert (
        main(
            [
                "adapters",
                "generate",
                "--adapter",
                f"a={a}",
                "--adapter",
                f"b={b}",
                "--prompt",
                "What does byte mean?",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "[a] What does byte mean?" in out and "[b] What does byte mean?" in out


def test_adapters_on_different_bases_are_refused(make_config, tmp_path, tiny_model_dir):
    import shutil

    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other_base)
    a = train(make_config, tmp_path, "a", max_steps=1)
    b = train(make_config, tmp_path, "b", max_steps=1, model_name=str(other_base))
    with pytest.raises(TunelabError, match="trained on different base models"):
        AdapterSet({"a": a, "b": b})
