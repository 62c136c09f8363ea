"""Generation, and interop: what tunelab saves loads in plain transformers + peft."""

import subprocess
import sys
import textwrap

import pytest
import torch

from tunelab.api import FineTuner
from tunelab.cli import main
from tunelab.generation import chat_loop, generate, load_for_inference


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    import json

    from tunelab.config import FineTuningConfig

    folder = tmp_path_factory.mktemp("gen")
    rows = [
        {"prompt": f"What does term {i} mean?", "completion": "A byte is eight bits."}
        for i in range(12)
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = FineTuningConfig(
        model_name=str(tiny_model_dir),
        dataset_path=str(folder / "train.jsonl"),
        output_dir=str(folder / "run"),
        learning_rate=1e-2,
        max_steps=15,
        batch_size=4,
        gradient_accumulation_steps=1,
        max_length=64,
        precision="fp32",
        target_modules=["all-linear"],
        system_prompt="Be brief.",
    )
    FineTuner(config).train()
    return folder / "run"


PLAIN_LOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    run = sys.argv[1]
    base = json.load(open(run + "/adapter_config.json"))["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(run)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "What does term 3 mean?"}],
        tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
        out = model.generate(**ids, max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    torch.save(logits, sys.argv[2])
    print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
""")


def test_plain_transformers_and_peft_match_tunelab(trained_run, tmp_path):
    # a separate interpreter with no tunelab import at all
    logits_file = tmp_path / "logits.pt"
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(trained_run), str(logits_file)],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = load_for_inference(str(trained_run))
    ours = generate(loaded, ["What does term 3 mean?"], max_new_tokens=12)[0]
    assert plain.stdout.strip() == ours
    text = loaded.tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What does term 3 mean?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        our_logits = loaded.model(**ids).logits[0, -1]
    torch.testing.assert_close(
        our_logits, torch.load(logits_file, weights_only=True), atol=1e-4, rtol=0
    )


def test_tuned_model_learned_the_answer_and_to_stop(trained_run):
    tuned = generate(
        load_for_inference(str(trained_run)), ["What does term 99 mean?"], max_new_tokens=20
    )[0]
    base = generate(
        load_for_inference(str(trained_run), use_adapter=False),
        ["What does term 99 mean?"],
        max_new_tokens=20,
    )[0]
    assert tuned == "A byte is eight bits."  # and then EOS: nothing after it
    assert base != tuned


def test_batched_left_padded_generation_matches_one_by_one(trained_run):
    loaded = load_for_inference(str(trained_run), use_adapter=False)
    prompts = ["What does term 1 mean?", "Define a kernel in a few words please, now."]
    together = generate(loaded, prompts, max_new_tokens=8)
    alone = [generate(loaded, [p], max_new_tokens=8)[0] for p in prompts]
    assert together == alone


def test_sampling_is_seeded(trained_run):
    loaded = load_for_inference(str(trained_run), use_adapter=False)
    a = generate(loaded, ["What"], max_new_tokens=10, do_sample=True, temperature=1.5, seed=3)
    b = generate(loaded, ["What"], max_new_tokens=10, do_sample=True, temperature=1.5, seed=3)
    assert a == b


def test_generate_and_chat_commands(trained_run, capsys, monkeypatch):
    assert (
        main(
            [
                "generate",
                str(trained_run),
                "--prompt",
                "What does term 5 mean?",
                "--max-new-tokens",
                "20",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == "A byte is eight bits."
    replies = iter(["What does term 7 mean?", "/reset", "", "/exit"])
    printed = []
    chat_loop(
        load_for_inference(str(trained_run)),
        max_new_tokens=20,
        input_fn=lambda _: next(replies),
        output_fn=printed.append,
    )
    assert printed[1:] == ["model> A byte is eight bits.", "(history cleared)"]


def test_generate_errors_name_the_problem(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(tmp_path / "empty"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "is neither a tunelab run folder (no adapter_config.json) nor a model folder" in err
    assert "Traceback" not in err
