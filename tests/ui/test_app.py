"""tunelab ui without a browser: the same messages as the CLI, files only from opened folders,
escaped dataset text, the YAML the CLI reads, and runs found from their folders."""

import re

import pytest
import yaml

pytest.importorskip("fastapi", reason="the ui extra is not installed (pip install 'tunelab[ui]')")
pytest.importorskip("multipart", reason="python-multipart is not installed (the ui extra)")

from fastapi.testclient import TestClient  # noqa: E402

from tests.conftest import write_jsonl  # noqa: E402
from tunelab.cli import main  # noqa: E402
from tunelab.config import load_config  # noqa: E402
from tunelab.ui.app import create_app  # noqa: E402


@pytest.fixture
def space(tmp_path, tiny_model_dir):
    (tmp_path / "space").mkdir()
    return tmp_path / "space"


@pytest.fixture
def client(space, tiny_model_dir):
    app = create_app(space)
    app.state.workspace.values.update(model_name=str(tiny_model_dir), strip_html=False)
    return TestClient(app)


def cli_error(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err.strip().removeprefix("error: ")


def page_error(text):
    found = re.findall(r'id="page-error">error: (.*?)</p>', text, re.S)
    return found[0] if found else None


def test_files_only_from_opened_folders(client, space, tmp_path):
    (space / "notes.txt").write_text("inside")
    (tmp_path / "secret.txt").write_text("outside")
    assert client.get("/files", params={"path": str(space / "notes.txt")}).text == "inside"
    for path in (str(space / ".." / "secret.txt"), str(tmp_path / "secret.txt"), "/etc/passwd"):
        reply = client.get("/files", params={"path": path})
        assert reply.status_code == 403
        assert "outside the folders opened in this app" in reply.json()["error"]
        assert "outside" not in reply.text.split("error")[0]
    # a data file outside is refused too, until its folder is opened
    write_jsonl(tmp_path / "other" / "train.jsonl", [{"text": "hello there"}])
    reply = client.post("/data/inspect", data={"path": str(tmp_path / "other" / "train.jsonl")})
    assert "outside the folders opened" in page_error(reply.text)
    client.post("/data/open-folder", data={"folder": str(tmp_path / "other")})
    reply = client.post("/data/inspect", data={"path": str(tmp_path / "other" / "train.jsonl")})
    assert page_error(reply.text) is None and 'id="summary"' in reply.text


def test_requests_from_another_site_are_refused(client, space):
    reply = client.post(
        "/api/ship",
        params={"path": str(space), "action": "merge"},
        headers={"origin": "http://evil.example"},
    )
    assert reply.status_code == 403 and "http://evil.example are refused" in reply.json()["error"]
    assert client.app.state.workspace.jobs.jobs == {}
    same = client.post("/api/config/check", data={}, headers={"origin": "http://testserver"})
    assert same.status_code == 200


def test_invalid_value_shows_the_cli_message_next_to_its_field(client, space, capsys):
    form = {"lora_r": "0", "learning_rate": "3e-4"}
    reply = client.post("/api/config/check", data=form).json()
    config_file = space / "c.yaml"
    config_file.write_text("dataset_path: x.jsonl\n")
    expected = cli_error(capsys, ["train", str(config_file), "--set", "lora_r=0"])
    assert reply["errors"] == {"lora_r": expected}
    assert reply["estimate"] is None
    wrong_type = client.post("/api/config/check", data={"learning_rate": "fast"}).json()
    assert wrong_type["errors"]["learning_rate"].endswith(
        "'learning_rate' is 'fast' (str), expected a number. Fix the value of 'learning_rate'."
    )
    # the saved form comes back with the message under the field and the typed value kept
    page = client.post("/configure", data={**form, "config_path": str(space / "run.yaml")})
    assert 'id="field-lora_r"' in page.text and expected.replace("'", "&#39;") in page.text
    assert not (space / "run.yaml").exists()


def test_form_saves_the_yaml_the_cli_reads_and_loads_it_back(client, space, tiny_model_dir):
    data = write_jsonl(space / "train.jsonl", [{"prompt": "a?", "completion": "b"}])
    form = {
        "model_name": str(tiny_model_dir),
        "dataset_path": str(data),
        "output_dir": str(space / "outputs" / "run"),
        "lora_r": "16",
        "target_modules": "[q_proj, k_proj]",
        "max_steps": "7",
        "eval_steps": "null",
        "lr_scheduler": "cosine",
        "config_path": str(space / "run.yaml"),
    }
    check = client.post("/api/config/check", data=form).json()
    assert check["errors"] == {} and "Peak memory per device" in check["estimate"]
    reply = client.post("/configure", data=form)
    assert "Saved" in reply.text
    config = load_config(space / "run.yaml")
    assert (config.lora_r, config.target_modules, config.max_steps) == (16, ["q_proj", "k_proj"], 7)
    assert config.lr_scheduler == "cosine" and config.eval_steps is None
    assert yaml.safe_load((space / "run.yaml").read_text())["lora_alpha"] == 32  # every key
    loaded = client.get("/configure", params={"load": str(space / "run.yaml")}).text
    assert re.search(r'name="lora_r" id="in-lora_r" value="16"', loaded)
    assert 'value="[q_proj, k_proj]"' in loaded
    # every key of the schema is in the form, with its help text
    from tunelab.config import FIELDS

    for name, spec in FIELDS.items():
        assert spec.metadata["help"].split("'")[0][:20] in loaded.replace("&#39;", "'")
        assert f'id="in-{name}"' in loaded
    assert "Peak learning rate of AdamW." in loaded


def test_data_report_marks_trained_tokens_and_escapes_text(client, space, capsys):
    rows = [
        {"prompt": f"What is <script>alert({i})</script> tag {i}?", "completion": f"Answer {i}."}
        for i in range(5)
    ] + [{"prompt": "What is <script>alert(0)</script> tag 0?", "completion": "Answer 0."}]
    data = write_jsonl(space / "train.jsonl", rows)
    reply = client.post("/data/inspect", data={"path": str(data)})
    text = reply.text
    assert "<script>alert" not in text  # the preview, the summary and the report page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert re.search(r"<mark>[^<]*Answer 1\.", text)  # the completion is in the loss
    summary = re.findall(r'id="summary">(.*?)</p>', text, re.S)[0]
    assert "6 rows loaded -&gt; 5 training examples" in summary and "1 exact duplicate" in summary
    # a bad file: the CLI's one-line message
    bad = space / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    reply = client.post("/data/inspect", data={"path": str(bad)})
    assert page_error(reply.text) == cli_error(capsys, ["data", "inspect", str(bad)]).replace(
        "'", "&#39;"
    ).replace('"', "&#34;")


def test_upload_is_stored_in_the_workspace_without_replacing(client, space):
    (space / "uploads").mkdir()
    (space / "uploads" / "train.jsonl").write_text("keep me")
    files = {"upload": ("../../train.jsonl", b'{"text": "uploaded text here"}\n')}
    reply = client.post("/data/inspect", data={"path": ""}, files=files)
    assert page_error(reply.text) is None
    assert (space / "uploads" / "train.jsonl").read_text() == "keep me"
    assert "uploaded text here" in (space / "uploads" / "train-1.jsonl").read_text()


def test_run_started_from_the_cli_is_listed_and_watched(client, space, make_config):
    from tunelab.api import FineTuner

    config = make_config(output_dir=str(space / "outputs" / "cli-run"), max_steps=3)
    FineTuner(config).train()
    runs = client.get("/runs").text
    assert "cli-run" in runs and "state-finished" in runs
    state = client.get("/api/run", params={"path": config.output_dir}).json()
    assert state["state"] == "finished" and state["step"] == 3 and state["total_steps"] == 3
    assert [s for s, _ in state["curves"]["loss"]] == [1, 2, 3]
    doctor = client.get("/doctor", params={"path": config.output_dir}).text
    assert 'id="findings"' in doctor


def test_other_host_needs_the_flag_and_warns(monkeypatch, capsys, space):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append(options))
    assert main(["ui", str(space)]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and "warning" not in capsys.readouterr().err
    assert main(["ui", str(space), "--host", "0.0.0.0", "--port", "9000"]) == 0
    assert calls[-1] == {"host": "0.0.0.0", "port": 9000, "log_level": "warning"}
    # a warning, so on stderr (through the tunelab logger's console handler)
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err
