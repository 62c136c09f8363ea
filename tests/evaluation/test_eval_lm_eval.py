"""lm-eval arguments built from a run folder (no conversion), and its errors."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluation.lm_eval_adapter import lm_eval_arguments, lm_eval_model_args


def saved_adapter_files(folder):
    """A whole (tiny) adapter weights file and tokenizer config: run folders are checked for
    a complete save before anything is built from them."""
    import torch
    from safetensors.torch import save_file

    save_file({"lora_A": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
    (folder / "tokenizer_config.json").write_text("{}")


def test_run_folder_becomes_hf_model_args_with_peft(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved_adapter_files(run)
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/m/base"}))
    assert lm_eval_model_args(run) == (
        f"pretrained=/m/base,peft={run.resolve()},tokenizer={run.resolve()},dtype=float32"
        ",trust_remote_code=False"
    )
    argv = lm_eval_arguments(run, "arc_easy, hellaswag", limit=10, include_path="/tasks")
    assert argv[argv.index("--tasks") + 1] == "arc_easy,hellaswag"
    assert argv[argv.index("--limit") + 1] == "10"
    assert argv[argv.index("--output_path") + 1] == str(run / "lm_eval")
    assert argv[argv.index("--include_path") + 1] == "/tasks"
    assert argv[:2] == ["--model", "hf"]


def test_merged_model_folder_is_passed_as_pretrained(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert lm_eval_model_args(tmp_path, "bfloat16") == (
        f"pretrained={tmp_path.resolve()},dtype=bfloat16,trust_remote_code=False"
    )
    (tmp_path / "tunelab_config.yaml").write_text("trust_remote_code: true\n")
    assert lm_eval_model_args(tmp_path).endswith(",trust_remote_code=True")


def test_lm_eval_errors(tmp_path):
    with pytest.raises(TunelabError, match="neither an adapter .* nor a model"):
        lm_eval_model_args(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    saved_adapter_files(tmp_path)
    with pytest.raises(TunelabError, match="no base_model_name_or_path"):
        lm_eval_model_args(tmp_path)
    odd = tmp_path / "a,b"
    odd.mkdir()
    (odd / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/m"}))
    saved_adapter_files(odd)
    with pytest.raises(TunelabError, match="contains ',' or '='"):
        lm_eval_model_args(odd)
    with pytest.raises(TunelabError, match="--lm-eval needs task names"):
        lm_eval_arguments(odd.parent, " , ")


def test_cli_lm_eval_without_the_harness_says_how_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    from tunelab.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
    )
    code = main(["eval", str(tmp_path), "--lm-eval", "arc_easy"])
    err = capsys.readouterr().err
    assert code != 0 and "pip install lm-eval" in err and "Traceback" not in err


def test_a_run_whose_tokenizer_adds_bos_asks_lm_eval_for_it(tmp_path, tiny_model_dir):
    # lm-eval's hf model encoded without special tokens by default (add_bos_token False but
    # for Gemma), so a Llama-style run was scored without the BOS its training texts had
    from tests.conftest import bos_adding_tokenizer
    from tunelab.models import load_tokenizer

    plain, run = tmp_path / "plain", tmp_path / "run"
    for folder, tokenizer in (
        (plain, load_tokenizer(str(tiny_model_dir))),
        (run, bos_adding_tokenizer(tiny_model_dir)),
    ):
        folder.mkdir()
        saved_adapter_files(folder)
        tokenizer.save_pretrained(folder)  # over the placeholder tokenizer_config.json
        (folder / "adapter_config.json").write_text(
            json.dumps({"base_model_name_or_path": str(tiny_model_dir)})
        )
    assert lm_eval_model_args(run).endswith(",trust_remote_code=False,add_bos_token=True")
    assert "add_bos_token" not in lm_eval_model_args(plain)
