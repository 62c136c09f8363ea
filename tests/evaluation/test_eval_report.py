"""The report, rendered in headless Chromium, shows the numbers that were measured."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from tunelab.evaluation.metrics import bootstrap_mean
from tunelab.evaluation.report import write_reports
from tunelab.evaluation.run import METRICS, EvalResults, SystemResult
from tunelab.evaluation.systems import EvalItem
from tunelab.evaluation.verdict import comparisons, verdict


def synthetic_results(tmp_path) -> EvalResults:
    items = [
        EvalItem(f"What is <term{i}>?", f"Reference & answer {i}", f"h.jsonl:{i}", terms=["t"])
        for i in range(4)
    ]
    scores = {
        "base": {"exact_match": [0, 0, 0, 1], "token_f1": [0.1, 0.2, 0.3, 0.4],
                 "rouge_l": [0.1] * 4, "chrf": [0.2] * 4, "term_score": [0, 0, 1, None],
                 "semantic": [0.3, 0.4, 0.35, 0.5], "judge": [None] * 4,
                 "loss": [2.0, 2.5, 3.0, 2.5]},
        "tuned": {"exact_match": [1, 0, 0, 1], "token_f1": [0.5, 0.6, 0.7, 0.8],
                  "rouge_l": [0.3] * 4, "chrf": [0.4] * 4, "term_score": [1, 1, 1, None],
                  "semantic": [0.6, 0.7, 0.65, 0.8], "judge": [None] * 4,
                  "loss": [1.0, 1.5, 2.0, 1.5]},
    }  # fmt: skip
    systems = {
        name: SystemResult(
            name,
            ["p"] * 4,
            [f"<b>{name}</b> answer {i}" for i in range(4)],
            s,
            40,
            100.0 if name == "base" else 60.0,
            2.0,
            80,
            1.0,
        )  # fmt: skip
        for name, s in scores.items()
    }
    summary = {n: {m: bootstrap_mean(s[m], 200) for m in METRICS} for n, s in scores.items()}
    differences = comparisons(scores, METRICS, 200)
    forgetting = {"base": {"perplexity": 20.0, "tokens": 900, "loss": 3.0},
                  "tuned": {"perplexity": 21.5, "tokens": 900, "loss": 3.07}}  # fmt: skip
    training = {"train_curve": [(1, 3.0), (2, 2.5), (3, 2.2)], "eval_curve": [(0, 3.1), (3, 2.4)],
                "train_runtime_seconds": 120.0}  # fmt: skip
    results = EvalResults(
        str(tmp_path / "run"), "h.jsonl", {"k": 3}, items, systems, summary, differences,
        forgetting, training,
    )  # fmt: skip
    means = {n: {m: summary[n][m].mean for m in METRICS} for n in scores}
    results.verdict = verdict(means, differences, forgetting, 120.0)
    return results


class Cells(HTMLParser):
    """Text of every element carrying data-metric / data-forgetting, keyed by its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[tuple[str, str], str] = {}
        self.key: tuple[str, str] | None = None
        self.verdict: list[str] = []
        self.in_verdict = False
        self.texts: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-metric" in a:
            self.key = (a.get("data-system") or a.get("data-pair") or "", a["data-metric"])
        elif "data-forgetting" in a:
            self.key = (a["data-forgetting"], "forgetting")
        if a.get("id") == "verdict":
            self.in_verdict = True

    def handle_endtag(self, tag):
        if tag == "ul":
            self.in_verdict = False

    def handle_data(self, data):
        self.texts.append(data)
        if self.key is not None:
            self.values[self.key] = data.strip()
            self.key = None
        elif self.in_verdict and data.strip():
            self.verdict.append(data.strip())


def test_report_files_escape_text(tmp_path):
    files = write_reports(synthetic_results(tmp_path), tmp_path)
    html = open(files["html"]).read()
    assert "&lt;b&gt;tuned&lt;/b&gt; answer 0" in html and "<b>tuned</b>" not in html
    assert "Reference &amp; answer 0" in html
    assert "<script" not in html
    md = open(files["markdown"]).read()
    assert "| tuned | 68.8 [" in md and "- tuned: 21.50" in md


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="chromium is not installed (apt-get install -y chromium); the rendered-report check "
    "needs it",
)
def test_rendered_report_shows_the_measured_numbers(tmp_path):
    results = synthetic_results(tmp_path)
    files = write_reports(results, tmp_path)
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
         f"file://{files['html']}"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    page = Cells()
    page.feed(dom)
    # the headline metrics are shown; exact match (0 on free text) and an unused judge are not
    assert ("base", "exact_match") not in page.values and ("base", "judge") not in page.values
    for name in ("base", "tuned"):
        for metric in (m for m in METRICS if m not in ("exact_match", "judge")):
            mean = results.summary[name][metric].mean
            shown = f"{mean:.3f}" if metric == "loss" else f"{mean * 100:.1f}"
            assert page.values[(name, metric)] == shown
    assert page.values[("base", "token_f1")] == "25.0"
    assert page.values[("tuned", "token_f1")] == "65.0"
    assert page.values[("tuned", "perplexity")] == f"{results.systems['tuned'].perplexity:.2f}"
    assert page.values[("tuned|base", "token_f1")] == "+40.00"
    assert page.values[("tuned", "forgetting")] == "21.50"
    assert page.verdict == results.verdict
    assert any("Fine-tuning beat the base model on" in v for v in page.verdict)
    # the SVG charts rendered: one per shown metric (not exact match, not the unused judge),
    # each with a bar label per system, and the loss curves
    assert len(re.findall(r"<svg", dom)) == len(METRICS) - 2 + 1
