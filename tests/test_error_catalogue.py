"""Every user-facing error, run through the CLI: one clear message naming what is wrong and
what to do, exit code 2, and no traceback."""

import json

import pytest

from tunelab.cli import main


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    (tmp_path / "good.jsonl").write_text(
        "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(8))
    )

    def config(name="run.yaml", **values):
        merged = {
            "model_name": str(tiny_model_dir),
            "dataset_path": "good.jsonl",
            "max_steps": 1,
            "max_length": 32,
            "precision": "fp32",
            "output_dir": "out",
        }
        merged.update(values)
        path = tmp_path / name
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in merged.items()))
        return str(path)

    return tmp_path, config


def write(path, data):
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path.name


CASES = {
    "unknown key": (dict(lora_rnk=4), ["unknown config key 'lora_rnk'", "Did you mean 'lora_r'"]),
    "wrong type": (dict(batch_size="four"), ["'batch_size' is 'four'", "expected an integer"]),
    "impossible value": (dict(learning_rate=-1), ["'learning_rate' is -1", "positive number"]),
    "bad choice": (dict(lr_scheduler="cosin"), ["allowed values", "Did you mean 'cosine'"]),
    "missing model folder": (
        dict(model_name="./nowhere"),
        ["not a local folder, a .gguf file", "smollm2-135m-instruct"],
    ),
    "offline hub id": (
        dict(model_name="someone/some-model"),
        ["could not load model", "may be offline"],
    ),
    "target module": (
        dict(target_modules=["q_projj"]),
        ["'target_modules' names 'q_projj'", "Did you mean 'q_proj'"],
    ),
    "missing data file": (dict(dataset_path="missing.jsonl"), ["missing.jsonl", "does not exist"]),
    "a block, not a layer, as target": (
        dict(target_modules=["self_attn"]),
        ["self_attn is an attention block", "its layers are k_proj, o_proj, q_proj, v_proj"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_and_model_errors(case, workspace, capsys):
    tmp_path, config = workspace
    values, expected = CASES[case]
    assert main(["train", config(**values)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)


DATA_CASES = {
    "malformed JSON line": (
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n',
        ["bad.jsonl:2", "not valid JSON", "Fix or delete that line"],
    ),
    "misspelt column": (b'{"promt": "a", "completion": "b"}\n', ["bad.jsonl", "promt", "prompt"]),
    "wrong type": (b'{"prompt": "a", "completion": 3}\n', ["bad.jsonl", "'completion'", "string"]),
    "empty file": (b"", ["bad.jsonl", "empty"]),
    "not UTF-8": (b'{"text": "caf\xe9"}\n', ["bad.jsonl", "UTF-8"]),
    "tool calls the template drops": (
        b'{"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", '
        b'"content": null, "tool_calls": [{"type": "function", "function": {"name": "get_weather",'
        b' "arguments": "{}"}}]}, {"role": "tool", "content": "4C"}, {"role": "assistant", '
        b'"content": "4 degrees."}]}\n',
        ["bad.jsonl:1: assistant message 1 has tool_calls", "'get_weather'"],
    ),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_errors(case, workspace, capsys):
    tmp_path, config = workspace
    data, expected = DATA_CASES[case]
    write(tmp_path / "bad.jsonl", data)
    assert main(["train", config(dataset_path="bad.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)


def test_empty_after_filtering_names_the_step(workspace, capsys):
    tmp_path, config = workspace
    assert main(["train", config(min_chars=10_000)]) == 2
    err = capsys.readouterr().err
    assert "min_chars" in err or "too short" in err, err


def test_output_and_resume_errors(workspace, capsys):
    tmp_path, config = workspace
    path = config()
    assert main(["train", path]) == 0
    capsys.readouterr()
    assert main(["train", path]) == 2
    assert "is not empty. Pass --overwrite" in capsys.readouterr().err
    assert main(["train", config(lora_r=4), "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main(["train", config(output_dir="fresh"), "--resume"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
