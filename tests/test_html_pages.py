"""The HTML reports are rendered from autoescaped Jinja2 templates: a hostile string in a run
name, a path, a question or an answer is shown as text in every report."""

from __future__ import annotations

import sys
from pathlib import Path

HOSTILE = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def test_eval_report_escapes_the_run_path_the_data_path_and_the_answers(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "evaluation"))
    from test_eval_report import synthetic_results

    from tunelab.evaluation.report import html_report

    results = synthetic_results(tmp_path / HOSTILE)
    results.eval_path = f"{HOSTILE}.jsonl"
    results.seconds = 1.0
    results.verdict = [HOSTILE]
    page = html_report(results)
    assert "<script" not in page
    assert page.count(ESCAPED) == 3  # the heading (run path), the data path, the verdict
    assert "&lt;b&gt;tuned&lt;/b&gt; answer 0" in page


def test_loss_curves_escape_their_legend(tmp_path):
    from tunelab.loss_curves import Curve, loss_svg

    svg = loss_svg([Curve(HOSTILE, [(1.0, 2.0), (2.0, 1.0)], "#000")])
    assert "<script" not in svg and f">{ESCAPED}</text>" in svg
    assert svg.count("<polyline") == 1


def test_data_report_histogram_escapes_its_title():
    from tunelab.data.report import histogram_svg

    stats = {"histogram": {"counts": [1, 2], "edges": [0, 5, 10]}, "count": 3, "max": 9}
    svg = histogram_svg(stats, HOSTILE)
    assert "<script" not in svg and f'aria-label="{ESCAPED}"' in svg
    assert svg.count("<rect") == 2


def test_reports_show_control_characters_in_data_as_escapes_and_keep_the_data(tmp_path):
    # with drop_control_chars off, a right-to-left override in a question reached the page as
    # is: HTML escaping leaves it, and the browser then shows the line reversed
    import json

    sys.path.insert(0, str(Path(__file__).parent / "evaluation"))
    from test_eval_report import synthetic_results

    from tunelab.data.report import histogram_svg
    from tunelab.evaluation.report import write_reports

    results = synthetic_results(tmp_path)
    results.items[0].question = "Is \u202etxet desrever\u202c safe?"
    results.systems["tuned"].answers[1] = "clear\x1b[2Jscreen\tand tab\nline"
    files = write_reports(results, tmp_path)
    page = Path(files["html"]).read_text()
    assert "\u202e" not in page and "\x1b" not in page and "\u202c" not in page
    assert "Is \\u202etxet desrever\\u202c safe?" in page
    assert "clear\\x1b[2Jscreen\tand tab\nline" in page  # tab and newline are layout, kept
    saved = json.loads(Path(files["json"]).read_text())
    assert saved["items"][0]["question"] == "Is \u202etxet desrever\u202c safe?"
    svg = histogram_svg(
        {"histogram": {"counts": [1], "edges": [0, 5]}, "count": 1, "max": 4}, "a\u202eb"
    )
    assert "\u202e" not in svg and 'aria-label="a\\u202eb"' in svg
