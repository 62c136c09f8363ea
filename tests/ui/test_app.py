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
from tunelab.errors import TunelabError  # noqa: E402
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


def test_an_upload_over_the_limit_is_refused_with_the_limit_named(space, tiny_model_dir):
    app = create_app(space, max_upload_mb=0.01)  # 10,485 bytes
    app.state.workspace.values.update(model_name=str(tiny_model_dir), strip_html=False)
    client = TestClient(app)
    expected = (
        "the upload is larger than this app's limit of 0.01 MiB. Type the file's path instead "
        "(files in the opened folders are read where they are), or start the app with a larger "
        "limit: tunelab ui --max-upload-mb N."
    ).replace("'", "&#39;")
    big = b"".join(b'{"text": "row %d of a file too large to upload"}\n' % i for i in range(400))
    assert len(big) > 0.01 * 2**20
    reply = client.post("/data/inspect", data={"path": ""}, files={"upload": ("big.jsonl", big)})
    assert reply.status_code == 200 and page_error(reply.text) == expected
    assert not (space / "uploads").exists()  # nothing of it was kept
    # a body sent without a Content-Length (chunked) is cut off at the limit too
    boundary = "tunelabboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="upload"; '
        'filename="big.jsonl"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()

    def chunks():
        yield head
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]
        yield f"\r\n--{boundary}--\r\n".encode()

    reply = client.post(
        "/data/inspect",
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert page_error(reply.text) == expected and not (space / "uploads").exists()
    # a file under the limit is stored and inspected
    small = b'{"text": "a small file, well under the limit"}\n' * 10
    reply = client.post("/data/inspect", files={"upload": ("small.jsonl", small)})
    assert page_error(reply.text) is None and 'id="summary"' in reply.text
    assert (space / "uploads" / "small.jsonl").read_bytes() == small
    # a file of exactly the limit passes with its multipart wrapping
    exact = b"x" * int(0.01 * 2**20)
    reply = client.post("/data/inspect", data={"path": ""}, files={"upload": ("at.txt", exact)})
    assert (space / "uploads" / "at.txt").read_bytes() == exact
    # an upload never follows a link out of uploads/, even a dangling one
    outside = space.parent / "outside.jsonl"
    (space / "uploads" / "link.jsonl").symlink_to(outside)
    reply = client.post("/data/inspect", files={"upload": ("link.jsonl", small)})
    assert not outside.exists() and (space / "uploads" / "link-1.jsonl").read_bytes() == small
    # the page says the limit, for the browser's own check before sending
    assert 'data-max-mb="0.01"' in client.get("/data").text
    with pytest.raises(TunelabError, match="--max-upload-mb is 0; give a size above 0"):
        create_app(space, max_upload_mb=0)


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


def test_run_started_from_the_cli_is_stopped_from_the_app_and_resumed(client, space, make_config):
    """Stop on a run this app did not start: the CLI's own process saves a checkpoint at the
    next step boundary and exits as after Ctrl-C; --resume continues it to the end."""
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tunelab.run_folder import STOP_REQUEST

    run_dir = space / "outputs" / "cli-run"
    # long enough that the stop lands mid-run on an idle machine too (~50 steps/s; the stop
    # is read at every step)
    config = make_config(
        output_dir=str(run_dir), max_steps=200, gradient_accumulation_steps=1, save_each_epoch=False
    )
    config_file = space / "cli-run.yaml"
    config.save(config_file)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    command = [sys.executable, "-m", "tunelab.cli", "train", str(config_file)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        state = {}
        while time.monotonic() < deadline and process.poll() is None:
            state = client.get("/api/run", params={"path": str(run_dir)}).json()
            if state["state"] == "running" and state["step"] >= 3:
                break
            time.sleep(0.2)  # polling for a state, not waiting for luck
        assert state.get("state") == "running", state
        reply = client.post("/api/run/stop", params={"path": str(run_dir)})
        assert reply.json() == {"stopping": True}
        assert json.loads((run_dir / STOP_REQUEST).read_text())["by"] == "tunelab ui"
        err, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 2, err
    assert "Stop requested by tunelab ui: saving a checkpoint after this step." in err
    stopped = int(re.search(r"training interrupted at step (\d+) of 200", err).group(1))
    assert 3 <= stopped < 200
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == f"step-{stopped:06d}"
    assert not (run_dir / STOP_REQUEST).exists()  # honoured, then removed
    state = client.get("/api/run", params={"path": str(run_dir)}).json()
    assert state["step"] == stopped and state["state"] in ("stopped", "running")
    # a stale request (from before the resumed process began) does not stop it again
    from tunelab.training.guards import request_stop

    request_stop(run_dir)
    resumed = subprocess.run(
        [*command, "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    from tunelab.runs import load_run

    assert [r["step"] for r in load_run(run_dir).train] == list(range(1, 201))
    assert not (run_dir / STOP_REQUEST).exists()
    assert client.get("/api/run", params={"path": str(run_dir)}).json()["state"] == "finished"
