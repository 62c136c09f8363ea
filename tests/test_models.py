import time

import pytest

from tunelab.api import FineTuner
from tunelab.config import FineTuningConfig
from tunelab.device import choose_placement
from tunelab.errors import TunelabError
from tunelab.methods import check_target_modules
from tunelab.models import (
    ensure_pad_token,
    load_model_config,
    load_tokenizer,
    model_modules,
    resolve_model,
)


def test_local_folder_resolves_and_bad_names_explain_themselves(tiny_model_dir, tmp_path):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir.resolve())
    (tmp_path / "weights").mkdir()
    with pytest.raises(
        TunelabError,
        match=r"has no config.json, so it is not a transformers "
        r"model. Point model_name at the folder",
    ):
        resolve_model(str(tmp_path / "weights"))
    with pytest.raises(TunelabError, match=r"model file .*missing.gguf does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(TunelabError, match=r"is not a local folder, a .gguf file, or a hub id"):
        resolve_model("./no/such/folder")


def test_hub_id_fails_with_a_clear_offline_message():
    assert resolve_model("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    with pytest.raises(
        TunelabError,
        match=r"could not load model 'HuggingFaceTB/SmolLM2-360M' .*"
        r"this machine may be offline.*smollm2-135m-instruct",
    ):
        load_model_config("HuggingFaceTB/SmolLM2-360M")


def test_pad_token_falls_back_without_new_embeddings(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenizer.pad_token == "<|im_end|>" and len(tokenizer) == 384

    class Bare:
        pad_token = eos_token = unk_token = None

    with pytest.raises(TunelabError, match="no pad, EOS or unknown token"):
        ensure_pad_token(Bare())


def test_target_modules_are_checked_against_the_model_before_loading(tiny_model_dir):
    names = model_modules(load_model_config(str(tiny_model_dir)))
    check_target_modules(FineTuningConfig(target_modules=["q_proj", "o_proj"]), names)
    with pytest.raises(
        TunelabError,
        match=r"'target_modules' names 'qproj', which the model .* "
        r"does not have. Did you mean 'q_proj'\? Its adaptable "
        r"layers are named: .*down_proj.*v_proj",
    ):
        check_target_modules(FineTuningConfig(target_modules=["qproj"]), names)


def test_fp16_on_cpu_is_refused_and_auto_says_why():
    with pytest.raises(TunelabError, match="fp16 needs a CUDA GPU"):
        choose_placement("fp16", "cpu")
    placement = choose_placement("auto", "cpu")
    assert placement.precision in ("bf16", "fp32") and placement.reason


@pytest.mark.slow
def test_default_model_is_converted_once_then_cached(capsys):
    location = resolve_model(None)
    assert resolve_model("smollm2-135m-instruct") == location
    started = time.perf_counter()
    tuner = FineTuner(FineTuningConfig())
    tuner.prepare_model()
    assert time.perf_counter() - started < 30  # a cached load, not a re-conversion
    assert "Trainable parameters: 460,800 (0.34%)" in capsys.readouterr().out
    assert tuner.tokenizer.pad_token is not None
    assert tuner.model.get_base_model().config.model_type == "llama"
