"""Reports: Markdown and HTML from a manifest; dataset text is always escaped."""

from __future__ import annotations

from tests.conftest import write_jsonl
from tunelab.config import FineTuningConfig
from tunelab.data.prepare import prepare_examples
from tunelab.data.report import render_html, render_markdown, write_reports


def manifest_for(tmp_path, rows, **settings):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    config = FineTuningConfig(dataset_path=str(path), data_cache=False, **settings)
    return prepare_examples(config).manifest


def test_html_escapes_dataset_text(tmp_path):
    evil = "<script>alert('x')</script> and <img src=x onerror=alert(1)>"
    rows = [{"prompt": evil + " mail a@b.org", "completion": "ok"}] * 2 + [
        {"prompt": "fine", "completion": "yes"}
    ]
    manifest = manifest_for(tmp_path, rows, strip_html=False)
    page = render_html(manifest)
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "a@b.org" not in page  # PII never shown
    assert page.count("<svg") == 1  # chars histogram (no tokenizer: no token chart)


def test_markdown_sections_and_files(tmp_path):
    rows = [{"text": "Hello there, this is a document."}] * 3 + [
        {"text": "He said hello to his father."}
    ]
    manifest = manifest_for(tmp_path, rows)
    markdown = render_markdown(manifest)
    for heading in ("## Steps", "## Lengths", "## Duplicates", "## PII", "## Bias"):
        assert heading in markdown
    assert "| train | exact dedup | 2 dropped (2 exact duplicate) |" in markdown
    md_path, html_path = write_reports(manifest, tmp_path / "report")
    assert md_path.read_text().startswith("# Data report") and html_path.read_text().startswith(
        "<!DOCTYPE html>"
    )
