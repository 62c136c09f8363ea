import dataclasses
from pathlib import Path

import pytest
import yaml

from tunelab.config import FineTuningConfig, load_config, parse_override, starter_config_text
from tunelab.errors import TunelabError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_seeds():
    c = FineTuningConfig()
    assert (c.lora_r, c.lora_alpha, c.lora_dropout) == (8, 32, 0.1)
    assert c.target_modules == ["q_proj", "v_proj"]
    assert (c.learning_rate, c.num_epochs, c.batch_size, c.max_length) == (3e-4, 3, 4, 512)
    assert (c.gradient_accumulation_steps, c.warmup_ratio) == (1, 0.1)  # see config.py
    assert c.model_name == "smollm2-135m-instruct"
    assert c.max_steps is None and c.precision == "auto"


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "dataset_path: data.jsonl\nlora_r: 16\nlearning_rate: 1e-4\n")
    c = load_config(
        path,
        [
            "num_epochs=2",
            "target_modules=[q_proj, k_proj]",
            "max_steps=5",
            "packing=false",
            "learning_rate=3e-4",
        ],
    )
    assert c.lora_r == 16 and c.num_epochs == 2 and c.max_steps == 5 and c.packing is False
    assert c.learning_rate == 3e-4  # '3e-4' is a string to YAML; the float field still reads it
    assert c.target_modules == ["q_proj", "k_proj"]
    assert c.dataset_path == str(tmp_path / "data.jsonl")  # relative to the config file


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "lora_rank: 8\n")
    with pytest.raises(
        TunelabError, match=r"unknown config key 'lora_rank'.*Did you mean 'lora_r'"
    ):
        load_config(path)
    with pytest.raises(
        TunelabError,
        match=r"--set learning_rat=1: unknown config key 'learning_rat'.*"
        r"'learning_rate'",
    ):
        load_config(write(tmp_path, "{}"), ["learning_rat=1"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora_r: 0", r"'lora_r' is 0, but it must be a whole number of at least 1"),
        ("learning_rate: -0.1", r"'learning_rate' is -0.1, but it must be a positive number"),
        ("lora_r: eight", r"'lora_r' is 'eight' \(str\), expected an integer"),
        ("lora_dropout: 1.5", r"'lora_dropout' is 1.5, but it must be in \[0, 1\)"),
        (
            "precision: bf61",
            r"'precision' is 'bf61'; allowed values are 'auto', 'fp32', 'bf16', "
            r"'fp16'.*Did you mean 'bf16'",
        ),
        ("lr_scheduler: cosin", r"Did you mean 'cosine'"),
        ("packing: 3", r"'packing' is 3 \(int\), expected true or false"),
        ("batch_size: 2.5", r"'batch_size' is 2.5 \(float\), expected an integer"),
        ("prompt_template: 'Q {x}'", r"'prompt_template' and 'completion_template' go together"),
    ],
)
def test_impossible_values_name_key_value_and_allowed(tmp_path, text, message):
    with pytest.raises(TunelabError, match=message):
        load_config(write(tmp_path, text))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(TunelabError, match=r"run.yaml line 2: not valid YAML"):
        load_config(write(tmp_path, "lora_r: 8\n  bad: [\n"))
    with pytest.raises(TunelabError, match=r"does not exist. Create one with 'tunelab init"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(TunelabError, match=r"expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(TunelabError, match=r"--set expects key=value"):
        parse_override("lora_r")


def test_starter_config_documents_every_key_and_loads_back(tmp_path):
    text = starter_config_text()
    for field in dataclasses.fields(FineTuningConfig):
        assert f"\n{field.name}:" in "\n" + text, field.name
        assert field.metadata["help"] in text
    path = write(tmp_path, text)
    loaded = load_config(path)
    assert loaded.lora_r == 8 and loaded.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "path",
    # examples/accelerate holds accelerate's launch configs, not tunelab's
    sorted(p for p in REPO.glob("examples/*/*.yaml") if p.parent.name != "accelerate"),
    ids=lambda p: p.parent.name,
)
def test_every_shipped_example_config_loads(path):
    config = load_config(path)
    # shipped data must be there; a later stage's data is written by its example into outputs/
    if "outputs" not in Path(config.dataset_path).parts:
        assert Path(config.dataset_path).is_file()
    assert yaml.safe_load(path.read_text())


def test_numbers_in_exponent_form_are_numbers_in_a_file_as_with_set(tmp_path):
    # YAML 1.1 (PyYAML's default) reads 1e-4 as a string; YAML 1.2 and the user read a number
    path = write(tmp_path, "learning_rate: 1e-4\nweight_decay: 1E-2\nlora_dropout: 5e-2\n")
    c = load_config(path)
    assert (c.learning_rate, c.weight_decay, c.lora_dropout) == (0.0001, 0.01, 0.05)
    assert load_config(path, ["learning_rate=3e-4"]).learning_rate == 0.0003
    assert parse_override("rank_pattern={v_proj: 16}") == ("rank_pattern", {"v_proj": 16})
    assert parse_override("max_grad_norm=2e0") == ("max_grad_norm", 2.0)
    # a text key takes the value as written, number-like or not
    assert parse_override("system_prompt=1e-4") == ("system_prompt", "1e-4")
    assert parse_override("system_prompt=1e") == ("system_prompt", "1e")


@pytest.mark.parametrize(
    "override, key, expected",
    [
        # YAML would cut a comment, read a dict, a bool or strip the quotes and trailing space
        ("system_prompt=You are the #1 support bot for ACME", "system_prompt",
         "You are the #1 support bot for ACME"),
        ("system_prompt=# hello", "system_prompt", "# hello"),
        ("system_prompt=yes", "system_prompt", "yes"),
        ("system_prompt='quoted'", "system_prompt", "'quoted'"),
        ("system_prompt=", "system_prompt", ""),
        ("system_prompt=null", "system_prompt", None),  # a nullable text key: exactly null
        ("system_prompt=~", "system_prompt", None),
        ("system_prompt=nullish", "system_prompt", "nullish"),
        ("prompt_template=Question: {question} Answer: ", "prompt_template",
         "Question: {question} Answer: "),
        ("completion_template={def}", "completion_template", "{def}"),
        ("output_dir=2024", "output_dir", "2024"),
        # other types keep YAML
        ("packing=yes", "packing", True),
        ("lora_r=16", "lora_r", 16),
        ("target_modules=[q_proj, v_proj]", "target_modules", ["q_proj", "v_proj"]),
    ],
)  # fmt: skip
def test_set_takes_a_text_value_literally(override, key, expected):
    assert parse_override(override) == (key, expected)


def test_set_text_values_reach_the_config(tmp_path):
    path = write(tmp_path, "dataset_path: d.jsonl\nsystem_prompt: from the file\n")
    c = load_config(
        path,
        [
            "system_prompt=You are the #1 support bot for ACME",
            "prompt_template=Question: {def} Answer: ",
            "completion_template={answer}",
        ],
    )
    assert c.system_prompt == "You are the #1 support bot for ACME"
    assert (c.prompt_template, c.completion_template) == ("Question: {def} Answer: ", "{answer}")
    assert load_config(path, ["system_prompt=null"]).system_prompt is None


def test_a_wrong_set_value_blames_the_set_not_the_file(tmp_path):
    path = write(tmp_path, "dataset_path: d.jsonl\nlora_r: 8\n")
    with pytest.raises(TunelabError) as err:
        load_config(path, ["lora_r=eight"])
    message = str(err.value)
    assert message.startswith("--set lora_r=eight: 'lora_r' is 'eight'"), message
    assert str(path) not in message


def test_a_saved_config_with_exponent_numbers_resumes_and_is_read_by_doctor(tmp_path):
    from tunelab.api import check_resumable
    from tunelab.diagnostics.run_report import read_run_config
    from tunelab.runs import load_run

    (tmp_path / "tunelab_config.yaml").write_text("learning_rate: 1e-4\nmax_steps: 2\n")
    check_resumable(tmp_path, FineTuningConfig(learning_rate=1e-4, max_steps=2))  # no refusal
    assert read_run_config(tmp_path)["learning_rate"] == 0.0001
    assert load_run(tmp_path).config["learning_rate"] == 0.0001


@pytest.mark.parametrize(
    ("settings", "warning"),
    [
        (
            {"method": "full", "lora_r": 16},
            "config key(s) lora_r (16) have no effect with method full",
        ),
        (
            {"method": "prompt_tuning", "target_modules": ["q_proj", "k_proj"]},
            "target_modules (['q_proj', 'k_proj']) have no effect with method prompt_tuning",
        ),
        ({"method": "ia3", "lora_dropout": 0.2}, "lora_dropout (0.2) have no effect with method"),
        ({"quantization_bits": 8}, "quantization_bits (8) have no effect with method lora"),
        (
            {"eval_steps": 5, "early_stopping_patience": 2},
            "eval_steps, early_stopping_patience need eval data, and there is none",
        ),
        ({"eval_path": "e.jsonl", "eval_split": 0.1}, "'eval_split' (0.1) is ignored because"),
        ({"max_steps": 3, "save_steps": 10}, "'save_steps' (10) is beyond max_steps (3)"),
        ({"max_steps": 3, "warmup_steps": 3}, "never reaches the peak learning rate"),
        ({"max_steps": 3, "num_epochs": 5}, "'num_epochs' (5) has no effect: max_steps (3)"),
        ({"mlflow_tracking_uri": "file:/x"}, "without 'mlflow' in report_to"),
        ({"system_prompt": "Be brief.", "chat_format": "plain"}, "'system_prompt' has no effect"),
        ({"drop_eval_leaks": True}, "'drop_eval_leaks' only acts on a separate eval_path"),
        (
            {"early_stopping_threshold": 0.01, "eval_split": 0.1},
            "'early_stopping_threshold' has no effect without",
        ),
        ({"group_by_length": False}, "'group_by_length' (False) has no effect with packing"),
    ],
)
def test_settings_that_cannot_take_effect_are_named(settings, warning):
    from tunelab.config import ineffective_settings

    found = ineffective_settings(FineTuningConfig(**settings))
    assert len(found) == 1 and warning in found[0], found


def test_defaults_and_used_settings_raise_no_warning():
    from tunelab.config import ineffective_settings

    assert ineffective_settings(FineTuningConfig()) == []
    used = FineTuningConfig(
        method="qlora", quantization_bits=8, lora_r=16, eval_split=0.1, eval_steps=5, max_steps=9
    )
    assert ineffective_settings(used) == []
    assert ineffective_settings(FineTuningConfig(method="full", learning_rate=2e-5)) == []
    assert ineffective_settings(FineTuningConfig(packing=False, group_by_length=False)) == []


def test_training_warns_before_the_model_loads(make_config, capsys, monkeypatch):
    from tunelab import api
    from tunelab.api import FineTuner

    tuner = FineTuner(make_config(method="full", lora_r=16, sharding="fsdp", max_steps=1))
    monkeypatch.setattr(api, "check_output_dir", lambda *a: pytest.fail("model stage reached"))
    with pytest.raises(pytest.fail.Exception):
        tuner.train()
    err = capsys.readouterr().err  # warnings go to stderr, through the tunelab logger
    ignored = "warning: config key(s) lora_r (16), lora_dropout (0.0) have no effect with method"
    assert ignored in err
    assert "warning: config key 'sharding' is fsdp, but this is one process" in err
    assert tuner.model is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("simpo_gamma", float("nan")),
        ("simpo_gamma", float("inf")),
        ("cpo_alpha", float("inf")),
        ("desirable_weight", float("inf")),
        ("weight_decay", float("inf")),
        ("loraplus_lr_ratio", float("inf")),
        ("neftune_noise_alpha", float("inf")),
        ("replay_general_share", float("nan")),
    ],
)
def test_number_keys_must_be_finite(key, value):
    """inf or nan passed the range checks (inf >= 0) and reached the loss or the optimizer."""
    with pytest.raises(TunelabError, match=f"config key '{key}' is {value!r}.*a finite number"):
        FineTuningConfig(objective="simpo", **{key: value})


def test_a_mix_weight_must_be_finite():
    with pytest.raises(TunelabError, match=r"'dataset_mix\.more\.jsonl' is inf.*finite"):
        FineTuningConfig(dataset_mix={"more.jsonl": float("inf")})


def test_a_negative_simpo_margin_is_refused():
    with pytest.raises(
        TunelabError, match=r"'simpo_gamma' is -0\.5.*zero or positive \(the reward"
    ):
        FineTuningConfig(objective="simpo", simpo_gamma=-0.5)
    FineTuningConfig(objective="simpo", simpo_gamma=0.0)  # no margin: plain length-normalized


def test_kto_with_both_weights_zero_is_refused():
    with pytest.raises(TunelabError, match="desirable_weight.*with both 0 the KTO loss is 0"):
        FineTuningConfig(objective="kto", desirable_weight=0.0, undesirable_weight=0.0)
    FineTuningConfig(objective="kto", desirable_weight=0.0)  # the other weight still teaches


@pytest.mark.parametrize(
    ("objective", "settings", "named"),
    [
        ("sft", {"beta": 0.5}, "beta (0.5)"),
        ("sft", {"desirable_weight": 2.0}, "desirable_weight (2.0)"),
        ("dpo", {"simpo_gamma": 1.0, "cpo_alpha": 0.5}, "simpo_gamma (1.0), cpo_alpha (0.5)"),
        ("kto", {"simpo_gamma": 1.0}, "simpo_gamma (1.0)"),
        ("simpo", {"undesirable_weight": 2.0}, "undesirable_weight (2.0)"),
    ],
)
def test_objective_keys_of_another_objective_are_named_at_start(objective, settings, named):
    from tunelab.config import ineffective_settings

    warnings = ineffective_settings(FineTuningConfig(objective=objective, **settings))
    assert [w for w in warnings if named in w and f"objective {objective};" in w]
    # the keys of the chosen objective are not named
    assert not ineffective_settings(FineTuningConfig(objective="simpo", simpo_gamma=1.0))


def test_probe_templates_are_checked_when_the_config_loads():
    """A bad template stopped tunelab eval only, after the training it was meant to judge."""
    with pytest.raises(TunelabError, match=r"probe_templates.*entry 2.*definition"):
        FineTuningConfig(probe_templates=["Explain {subject}.", "Is {subject} {definition}?"])
