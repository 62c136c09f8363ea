"""One schema drives everything: each config key's stage, resumability and choices, and what
is generated from them (the data cache key, the resume check, ``train --help``, the estimate
command's options, the web form and the CLI's choices)."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest
import yaml

import tunelab.data
from tunelab.api import RUN_CONFIG, check_resumable
from tunelab.cli import build_parser
from tunelab.config import (
    DATA_KEYS,
    FIELDS,
    PRECISIONS,
    RESUMABLE_KEYS,
    STAGES,
    FineTuningConfig,
    _default,
    choices_of,
    stage_keys,
)
from tunelab.data.prepare import content_hash
from tunelab.errors import TunelabError
from tunelab.ui.forms import form_fields

# a second valid value for keys whose first guess (below) would not be valid
OTHER_VALUE = {
    "prompt_template": "Q: {term}",
    "completion_template": "A: {definition}",
    "clean_rules": ["foo => bar"],
    "bias_wordlists": ["extra.json"],
    "dataset_mix": {"/data/forum.jsonl": 0.2},
    "max_chars": 500,
    "max_tokens": 100,
    "max_length": 256,
    "data_format": "csv",
    "eval_path": "/data/eval.jsonl",
    "dataset_path": "/data/other.jsonl",
    "lora_r": 4,
    "adalora_init_r": 16,
    "replay_general_share": 0.1,
    "target_modules": ["k_proj"],
    "add_tokens": ["<x>"],
}
# keys that only take effect together with another (both configs of a comparison hold these)
TEMPLATES = {"prompt_template": "{term}", "completion_template": "{definition}"}
COMPANION = {
    "prompt_template": TEMPLATES,
    "completion_template": TEMPLATES,
    "add_tokens": {"train_embeddings": True},
    "drop_eval_leaks": {"eval_path": "/data/eval.jsonl"},
    "label_smoothing": {"objective": "dpo"},
}


def other_value(name: str) -> object:
    """A valid value of ``name`` other than its default."""
    if name in OTHER_VALUE:
        return OTHER_VALUE[name]
    default = _default(name)
    allowed = choices_of(name)
    if allowed and not isinstance(default, list):
        return next(a for a in allowed if a != default)
    if allowed:
        return [allowed[0]]
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2 if default else 0.1
    if default is None:  # an optional number or text
        hint = str(typing.get_type_hints(FineTuningConfig)[name])
        return (
            0.5 if "float" in hint else 3 if "int" in hint else False if "bool" in hint else "text"
        )
    if isinstance(default, str):
        return default + "x"
    if default == []:
        return ["{subject}?"]
    if default == {}:
        return {"v_proj": 16}
    raise AssertionError(f"no other value for {name}")


def changed(name: str) -> FineTuningConfig:
    return FineTuningConfig(**{**COMPANION.get(name, {}), name: other_value(name)})


def test_every_key_declares_its_stage_and_resumability():
    for name, spec in FIELDS.items():
        assert spec.metadata["stage"] in STAGES, name
        assert isinstance(spec.metadata["resumable"], bool), name
        assert spec.metadata["help"].strip(), name
    assert sorted(n for names in stage_keys().values() for n in names) == sorted(FIELDS)
    assert "data_cache" not in DATA_KEYS  # whether to reuse the cache does not change the data
    assert {"seed", "max_length"} <= set(DATA_KEYS)  # training keys the data stage reads


@pytest.mark.parametrize("name", DATA_KEYS)
def test_changing_any_data_key_changes_the_data_cache_key(name):
    inputs = {"train": [{"path": "/data/train.jsonl", "sha256": "0" * 64}]}
    before = FineTuningConfig(**COMPANION.get(name, {}))
    after = changed(name)
    if name in ("dataset_path", "eval_path"):  # the inputs' hashes and names stand for them
        path = str(getattr(after, name))
        split = "train" if name == "dataset_path" else "eval"
        moved = {**inputs, split: [{"path": path, "sha256": "1" * 64}]}
        assert content_hash(before, None, inputs) != content_hash(after, None, moved)
        return
    assert content_hash(before, None, inputs) != content_hash(after, None, inputs), name


def _data_stage_reads() -> dict[str, set[str]]:
    """Config keys the data stage's modules read: ``config.key`` / ``c.key``, and the quoted
    keys of a function that reads ``getattr(config, key)``."""
    reads: dict[str, set[str]] = {}
    for path in sorted(Path(tunelab.data.__file__).parent.glob("*.py")):
        if path.name == "cli.py":  # the command: where to write, which tokenizer to load
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names: set[str] = set()
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("config", "c", "cfg")
                and node.attr in FIELDS
            ):
                names.add(node.attr)
            if isinstance(node, ast.FunctionDef) and any(
                isinstance(call, ast.Call)
                and getattr(call.func, "id", None) == "getattr"
                and getattr(call.args[0], "id", None) in ("config", "c", "cfg")
                for call in ast.walk(node)
            ):
                names |= {
                    const.value
                    for const in ast.walk(node)
                    if isinstance(const, ast.Constant) and const.value in FIELDS
                }
        reads[path.name] = names
    return reads


def test_every_key_the_data_stage_reads_is_in_the_cache_key():
    # a key read by the data stage but missing from the cache key means stale cached data
    allowed = {
        "data_cache",  # whether to use the cache at all
        "objective",  # preference data (data/preference.py) is not cached
    }
    reads = _data_stage_reads()
    assert "min_alpha_ratio" in reads["prepare.py"]  # read through getattr: seen too
    missing = {
        module: sorted(names - set(DATA_KEYS) - allowed)
        for module, names in reads.items()
        if names - set(DATA_KEYS) - allowed
    }
    assert missing == {}, f"mark these keys data=True in tunelab/config.py: {missing}"


def _saved_run(tmp_path: Path, config: FineTuningConfig) -> Path:
    (tmp_path / RUN_CONFIG).write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_the_resume_check_follows_the_schema(tmp_path, name):
    if name == "gradient_accumulation_steps":  # checked as micro-batches per step instead
        return
    run = _saved_run(tmp_path, FineTuningConfig(**COMPANION.get(name, {})))
    now = changed(name)
    if FIELDS[name].metadata["resumable"]:
        check_resumable(run, now)
        return
    with pytest.raises(TunelabError, match=rf"cannot resume .*\b{name}: .* in the run"):
        check_resumable(run, now)


def test_resumable_keys_are_how_long_and_what_is_reported():
    assert set(RESUMABLE_KEYS) == {
        "max_steps",
        "num_epochs",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "eval_path",
        "output_dir",
        "eval_each_epoch",
        "save_each_epoch",
        "save_total_limit",
        "early_stopping_patience",
        "early_stopping_threshold",
        "report_to",
        "mlflow_tracking_uri",
        "plot",
        "on_nan",
        "sharding",
    }


def _help(command: str) -> str:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[command].format_help()


def test_train_help_lists_every_key_by_stage_with_type_and_default():
    text = _help("train")
    for title in STAGES.values():
        assert f"\n{title}:\n" in text
    for name in FIELDS:
        assert f"\n  {name} (" in text, name
    assert "  lr_scheduler (linear|cosine|constant; default linear)\n" in text
    assert "  max_steps (int|null; default null, may change on --resume)\n" in text
    assert "  quantization_bits (4|8; default 4)\n" in text
    assert "      Peak learning rate of AdamW.\n" in text
    # under its own stage: packing is listed after the Training heading, before Evaluation
    training, evaluation = (
        text.index(f"\n{STAGES['training']}:"),
        text.index(f"\n{STAGES['evaluation']}:"),
    )
    assert training < text.index("\n  packing (bool; default true)") < evaluation


def test_estimate_options_are_the_config_keys_it_reads(tmp_path, capsys):
    from tunelab.planning.cli import estimate_keys, setup_values

    text = _help("estimate")
    for key in estimate_keys():
        assert "--" + key.replace("_", "-") in text, key
    assert "sharding" in estimate_keys() and "quantization_bits" in estimate_keys()
    assert "{auto,fp32,bf16,fp16}" in text and "{lora,dora,qlora,full}" in text
    # a config's sharding reaches the estimate (it was dropped before)
    assert setup_values(FineTuningConfig(sharding="fsdp"))["sharding"] == "fsdp"
    # an option overrides the run config it is given with
    config = tmp_path / "run.yaml"
    config.write_text("batch_size: 2\nmax_length: 128\n", encoding="utf-8")
    parser = build_parser()
    args = parser.parse_args(
        ["estimate", "smollm2-135m", "--config", str(config), "--batch-size", "8", "--json"]
    )
    assert args.func(args) == 0
    estimate = yaml.safe_load(capsys.readouterr().out)
    assert estimate["setup"]["batch_size"] == 8 and estimate["setup"]["max_length"] == 128
    # a wrong value is the config's own message
    with pytest.raises(SystemExit):
        parser.parse_args(["estimate", "--precision", "bf61"])
    args = parser.parse_args(["estimate", "--lora-r", "0"])
    with pytest.raises(TunelabError, match="config key 'lora_r' is 0"):
        args.func(args)


def test_the_web_form_is_grouped_by_stage_with_the_schema_choices():
    groups = form_fields({})
    assert [title for title, _ in groups] == list(STAGES.values())
    fields = {f.name: f for _, group in groups for f in group}
    assert sorted(fields) == sorted(FIELDS)
    assert fields["precision"].choices == PRECISIONS
    assert fields["quantization_bits"].choices == ("4", "8")
    assert fields["report_to"].choices is None  # a list: typed as YAML text
    assert fields["learning_rate"].choices is None


@pytest.mark.parametrize("name", [n for n in FIELDS if choices_of(n)])
def test_choices_are_validated_from_the_type(name):
    bad = ["nonsense"] if isinstance(_default(name), list) else "nonsense"
    if all(isinstance(a, int) for a in choices_of(name) or ()):
        bad = 3
    with pytest.raises(TunelabError, match=f"config key '{name}'"):
        FineTuningConfig(**{name: bad})


def test_the_cli_choices_are_the_schema_choices():
    for command in ("generate", "serve", "chat"):
        text = _help(command)
        assert "{" + ",".join(PRECISIONS) + "}" in text, command


def test_no_code_sets_a_config_key_after_validation():
    # the config is frozen; setting a key is a new config (dataclasses.replace validates it)
    root = Path(tunelab.data.__file__).parents[1]
    offenders = []
    for path in root.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr in FIELDS
                    and "config" in ast.unparse(target.value)
                    and "peft_config" not in ast.unparse(target.value)
                ):
                    offenders.append(f"{path.name}:{node.lineno} {ast.unparse(target)}")
    assert offenders == []
