"""The whole loop in a real headless Chromium on the tiny model: data, an invalid config value,
a run started, stopped (checkpoint kept) and resumed, its curves, the doctor, a comparison with a
CLI run, and the base-vs-tuned chat. Screenshots of every page go to $TUNELAB_UI_SCREENSHOTS
when it is set (docs/ui/ holds the committed ones)."""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the ui extra is not installed (pip install 'tunelab[ui]')")
pytest.importorskip("multipart", reason="python-multipart is not installed (the ui extra)")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="chromium is not installed (apt-get install -y chromium); the browser tests need it",
)

from tests.conftest import write_jsonl  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(tmp_path, tiny_model_dir):
    import uvicorn

    from tunelab.ui.app import create_app

    space = tmp_path / "space"
    space.mkdir()
    app = create_app(space)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", space, app
    instance.should_exit = True
    thread.join(timeout=10)
    for job in app.state.workspace.jobs.jobs.values():
        if job.running:
            job.process.kill()
            job.process.wait()


@pytest.fixture
def page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), args=["--no-sandbox"]
        )
        view = browser.new_page(viewport={"width": 1400, "height": 900})
        view.set_default_timeout(60_000)
        yield view
        browser.close()


def shot(page, name: str) -> None:
    folder = os.environ.get("TUNELAB_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=False)


def test_the_whole_loop_in_a_browser(server, page, tiny_model_dir, qa_rows, make_config):
    url, space, app = server
    expect = sync_api.expect
    expect.set_options(timeout=60_000)  # a 2-core machine shared with a training process
    rows = [
        {"prompt": f"What does {r['term']} mean?", "completion": r["definition"]} for r in qa_rows
    ] * 4
    data = write_jsonl(space / "train.jsonl", rows)
    app.state.workspace.values.update(model_name=str(tiny_model_dir), dedup_exact=False)

    # 0. an upload over the app's limit is refused in the page, before it is sent
    app.state.workspace.max_upload_mb = 0.01
    page.goto(f"{url}/data")
    too_big = {"name": "big.jsonl", "mimeType": "text/plain", "buffer": b"x" * 20_000}
    page.set_input_files("#data-upload", too_big)
    page.click("#inspect")
    expect(page.locator("#upload-error")).to_contain_text(
        "error: the upload is larger than this app's limit of 0.01 MiB."
    )
    assert not (space / "uploads").exists()
    app.state.workspace.max_upload_mb = 1024

    # 1. data: the report, and a preview with the trained tokens marked
    page.goto(f"{url}/data")
    page.fill("#data-path", str(data))
    page.click("#inspect")
    expect(page.locator("#summary")).to_contain_text("24 rows loaded")
    marked = page.locator(".preview mark").first
    expect(marked).to_contain_text("A program that translates source code")
    assert "What does compiler mean?" not in marked.inner_text()  # the prompt is not trained
    shot(page, "1-data")

    # 2. configure: an invalid value gets the CLI's message beside its field
    page.click("#to-configure")
    expect(page.locator("#in-dataset_path")).to_have_value(str(data))
    page.fill("#in-lora_r", "0")
    error = page.locator("#error-lora_r")
    expect(error).to_have_text(
        "config key 'lora_r' is 0, but it must be a whole number of at least 1 (8 is typical). "
        "Change 'lora_r' in the config or with --set lora_r=..."
    )
    expect(page.locator("#field-lora_r")).to_have_class("field invalid")
    shot(page, "2-configure-invalid")
    page.fill("#in-lora_r", "8")
    expect(error).to_have_text("")
    settings = {
        "output_dir": str(space / "outputs" / "ui-run"),
        # long enough that the stop below lands mid-run on a fast, idle machine too (the tiny
        # model runs ~50 steps/s there; the page polls once a second)
        "max_steps": "1000",
        "batch_size": "2",
        "max_length": "64",
        "learning_rate": "3e-3",
        "logging_steps": "1",
        "lora_dropout": "0.0",
        "save_each_epoch": "false",
        "eval_path": str(data),
        "eval_each_epoch": "false",
        "eval_steps": "250",
        "precision": "fp32",
    }
    for key, value in settings.items():
        if page.locator(f"select#in-{key}").count():
            page.select_option(f"#in-{key}", value)
        else:
            page.fill(f"#in-{key}", value)
    expect(page.locator("#estimate")).to_contain_text("Peak memory per device")
    expect(page.locator("#estimate")).to_contain_text("batch 2 x 64 tokens")
    shot(page, "2-configure")
    page.fill("#config-path", str(space / "ui-run.yaml"))

    # 3. train and watch, stop (a checkpoint is kept) and resume
    page.click("#train")
    page.wait_for_url("**/run?path=*")
    expect(page.locator("#state")).to_have_text("running", timeout=120_000)
    page.wait_for_function("Number(document.getElementById('step').textContent) >= 3")
    page.click("#stop")
    expect(page.locator("#state")).to_have_text("stopped", timeout=120_000)
    run_dir = space / "outputs" / "ui-run"
    assert list((run_dir / "checkpoints").iterdir())
    stopped_at = int(page.locator("#step").inner_text())
    assert 3 <= stopped_at < 1000
    page.click("#resume")
    expect(page.locator("#state")).to_have_text("running")
    # closing the browser tab does not stop the run
    page.goto(f"{url}/runs")
    expect(page.locator("#runs")).to_contain_text("ui-run")
    page.goto(f"{url}/run?path={run_dir}")
    # (a bound, not a wait: a 2-core machine shared with other jobs trains ~1-2 steps/s)
    expect(page.locator("#state")).to_have_text("finished", timeout=1_800_000)
    expect(page.locator("#step")).to_have_text("1000")
    assert int(page.locator("#chart-loss").get_attribute("data-points")) >= 1000 + 3
    assert page.locator("#chart-lr polyline").count() == 1
    assert float(page.locator("#tps").inner_text()) > 0
    shot(page, "3-run")
    from tunelab.runs import load_run

    steps = [r["step"] for r in load_run(run_dir).train]
    assert steps == list(range(1, 1001))  # the resumed run continues where it stopped

    # 4. judge: the doctor, a comparison with a run started from the CLI, the chat
    page.click("#doctor")
    expect(page.locator("#findings")).to_be_visible()
    page.locator("#findings").scroll_into_view_if_needed()
    shot(page, "4-doctor")
    from tunelab.api import FineTuner

    cli_run = make_config(output_dir=str(space / "outputs" / "cli-run"), max_steps=4)
    FineTuner(cli_run).train()
    page.goto(f"{url}/runs")
    expect(page.locator("#runs")).to_contain_text("cli-run")
    shot(page, "3-runs")
    page.goto(f"{url}/compare")
    for box in page.locator("input[name=path]").all():
        box.check()
    page.click("#compare")
    frame = page.frame_locator("#comparison")
    expect(frame.locator("h1")).to_have_text("Run comparison")
    expect(frame.locator("body")).to_contain_text("max_steps")
    shot(page, "4-compare")

    page.goto(f"{url}/chat?path={run_dir}")
    prompt = "What does kernel mean?"
    page.fill("#chat-prompt", prompt)
    page.fill("#chat-max", "12")
    page.click("#send")
    for pane in ("#answer-base", "#answer-tuned"):
        expect(page.locator(pane)).to_have_attribute("data-done", "true", timeout=120_000)
    from tunelab.generation import generate, load_for_inference

    tuned = generate(load_for_inference(str(run_dir)), [prompt], max_new_tokens=12)[0]
    base = generate(
        load_for_inference(str(run_dir), use_adapter=False), [prompt], max_new_tokens=12
    )[0]
    assert page.locator("#answer-tuned").inner_text().strip() == tuned
    assert page.locator("#answer-base").inner_text().strip() == base
    assert tuned != base
    shot(page, "4-chat")

    # 5. ship: merge, export, eval and serve through the CLI's commands, in their own processes
    page.goto(f"{url}/run?path={run_dir}")
    ship_log = page.locator("#ship-log")
    page.click("#merge")
    expect(ship_log).to_have_attribute("data-state", "done", timeout=180_000)
    assert (space / "outputs" / "ui-run-merged" / "config.json").is_file()

    # export: a new GGUF file beside the run; a file of the user's at the usual name is kept
    users_file = run_dir / "ui-run-f16.gguf"
    users_file.write_bytes(b"GGUF my own model, not tunelab's")
    page.click("#export")
    expect(ship_log).to_have_attribute("data-state", "done", timeout=300_000)
    assert users_file.read_bytes() == b"GGUF my own model, not tunelab's"
    exported = run_dir / "ui-run-2-f16.gguf"
    assert exported.read_bytes()[:4] == b"GGUF" and exported.stat().st_size > 10_000
    expect(ship_log).to_contain_text(f"Wrote {exported}")

    # eval: the report, shown in the page
    page.fill("#eval-limit", "4")
    page.click("#eval")
    expect(ship_log).to_have_attribute("data-state", "done", timeout=600_000)
    report = page.frame_locator("#eval-frame")
    expect(report.locator("h1")).to_have_text(f"Evaluation of {run_dir}")
    expect(report.locator("body")).to_contain_text("4 held-out examples from")
    expect(report.locator("body")).to_contain_text("tuned+rag")
    page.locator("#eval-box").scroll_into_view_if_needed()
    shot(page, "5-ship")

    # serve: the address shows once the server answers there; Stop ends it
    if page.locator("#serve").count():
        import json
        import urllib.request

        # scrolled to first: with the mouse left over the (sandboxed, out-of-process) report
        # frame, Chromium dropped the first synthetic click after Playwright's own scroll
        page.locator("#serve").scroll_into_view_if_needed()
        page.click("#serve")
        address = page.locator("#serve-address")
        expect(address).to_be_visible(timeout=300_000)
        served = address.inner_text()
        assert served.startswith("http://127.0.0.1:") and served.endswith("/v1")
        with urllib.request.urlopen(f"{served}/models", timeout=30) as reply:
            names = [m["id"] for m in json.load(reply)["data"]]
        assert "ui-run" in names
        page.locator("#ship-log").scroll_into_view_if_needed()
        shot(page, "5-serve")
        page.click("#serve-stop")
        expect(page.locator("#serve-status")).to_have_attribute("data-state", "stopped")
        expect(page.locator("#serve-status")).to_have_text("not serving")
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{served}/models", timeout=5)
