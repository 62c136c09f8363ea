"""Time from ``tunelab ui`` to a trained run on the default model, clicked as a new user would.

    python benchmarks/ui_first_run.py [--workspace DIR] [--port 7860] [--headed]

Copies the shipped computing-terms example (its data and config.yaml, which keep the default
model, SmolLM2-135M-Instruct) into an empty workspace, starts ``tunelab ui`` on it as a shell
would, and drives Chromium (Playwright) through it: load the example's config, inspect its
data, look at the form and its estimate, Save and train, then watch the run page until the
run is finished. Prints the wall time of each phase and the total. Needs the ui extra,
playwright and a chromium on PATH, and the default model in tunelab's cache (as for
``tunelab train``). Not a test: a measurement (the machine may be shared; say so with the
figures).
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "computing-terms"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_app(url: str, process: subprocess.Popen, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"tunelab ui exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"tunelab ui did not answer at {url} within {limit_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", help="Empty folder to work in (default: a new temp one).")
    parser.add_argument("--port", type=int, default=0, help="Port for tunelab ui (a free one).")
    parser.add_argument("--headed", action="store_true", help="Show the browser window.")
    parser.add_argument("--timeout-min", type=float, default=120, help="Give up after (120).")
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    workspace = Path(args.workspace or tempfile.mkdtemp(prefix="tunelab-ui-first-run-"))
    example = workspace / "examples" / "computing-terms"
    shutil.copytree(EXAMPLE / "data", example / "data")
    shutil.copy(EXAMPLE / "config.yaml", example / "config.yaml")
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    limit_ms = args.timeout_min * 60_000
    phases: list[tuple[str, float]] = []
    begun = last = time.perf_counter()  # set again once the browser is up

    def phase(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        phases.append((name, now - last))
        print(f"{name:<44} {now - last:8.1f} s", flush=True)
        last = now

    with sync_playwright() as playwright:
        # the browser is open before the clock starts, as a user's would be
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"),
            headless=not args.headed,
            args=["--no-sandbox"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(limit_ms)
        expect.set_options(timeout=limit_ms)
        page.goto("about:blank")
        begun = last = time.perf_counter()
        command = [sys.executable, "-m", "tunelab.cli", "ui", str(workspace), "--port", str(port)]
        app = subprocess.Popen(command)
        try:
            wait_for_app(f"{url}/data", app)
            phase("app up (tunelab ui answers)")

            # the example's config names its data and maps its columns (term, definition)
            page.goto(f"{url}/configure")
            page.fill("input[name=load]", str(example / "config.yaml"))
            page.click("form[action='/configure'][method=get] button")
            expect(page.locator("#in-model_name")).to_have_value("smollm2-135m-instruct")
            phase("config loaded (examples/computing-terms)")

            page.goto(f"{url}/data")
            expect(page.locator("#data-path")).to_have_value(re.compile(r"data/train\.jsonl$"))
            page.click("#inspect")
            expect(page.locator("#summary")).to_contain_text("rows loaded")
            expect(page.locator(".preview mark").first).to_be_visible()
            phase("data inspected (report and preview)")

            page.click("#to-configure")
            expect(page.locator("#estimate")).to_contain_text("Peak memory per device")
            page.click("#train")
            page.wait_for_url("**/run?path=*")
            phase("config checked, Save and train clicked")

            expect(page.locator("#state")).to_have_text("running")
            expect(page.locator("#step")).not_to_have_text("0")
            phase("training: first step shown")
            expect(page.locator("#state")).to_have_text("finished")
            phase("training: finished")
        finally:
            browser.close()
            app.terminate()
            app.wait(timeout=60)
    total = time.perf_counter() - begun
    print(f"{'total (tunelab ui to a trained run)':<44} {total:8.1f} s")
    print(f"workspace: {workspace}")


if __name__ == "__main__":
    main()
