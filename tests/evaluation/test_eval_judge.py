"""The LLM judge against a local fake OpenAI-compatible server: request format, grades, errors."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluation.judge import RUBRIC, RUBRIC_ID, judge_scores


@pytest.fixture
def fake_openai():
    """A chat-completions server on 127.0.0.1 that records requests and replies with the
    grades queued in ``state['replies']`` (a status code instead of text sends that error),
    then with ``state['default']``."""
    state: dict = {"requests": [], "replies": [], "default": "3"}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append(
                {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
            )
            reply = state["replies"].pop(0) if state["replies"] else state["default"]
            if isinstance(reply, int):
                self.send_response(reply)
                self.end_headers()
                self.wfile.write(b'{"error": {"message": "model not found"}}')
                return
            choice = {"index": 0, "finish_reason": "stop",
                      "message": {"role": "assistant", "content": reply}}  # fmt: skip
            payload = {"object": "chat.completion", "model": body["model"], "choices": [choice]}
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_port}/v1"
    yield state
    server.shutdown()


def test_judge_sends_chat_completions_with_the_rubric_and_reads_grades(fake_openai, monkeypatch):
    monkeypatch.setenv("TUNELAB_JUDGE_API_KEY", "sk-test")
    fake_openai["replies"] = ["5", "Grade: 2", "no idea"]
    cache: dict = {}
    scores = judge_scores(
        fake_openai["url"] + "/", "judge-model",
        ["What does TCP mean?", "What does TCP mean?", "What is a byte?", "What is a byte?"],
        ["A transport protocol.", "A transport protocol.", "Eight bits.", "Eight bits."],
        ["A reliable transport protocol.", "A kind of cable.", "Eight bits", ""],
        cache=cache,
    )  # fmt: skip
    # grade 5 -> 1.0, 2 -> 0.25, no digit -> None; an empty answer is not sent (0.0)
    assert scores == [1.0, 0.25, None, 0.0]
    requests = fake_openai["requests"]
    assert len(requests) == 3
    first = requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["auth"] == "Bearer sk-test"
    body = first["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == RUBRIC
    user = body["messages"][1]["content"]
    assert user == (
        "Question:\nWhat does TCP mean?\n\nReference answer:\nA transport protocol.\n\n"
        "Answer to grade:\nA reliable transport protocol.\n\nGrade (1-5):"
    )
    # the same (question, reference, answer) from another system is not asked again
    again = judge_scores(fake_openai["url"], "judge-model", ["What does TCP mean?"],
                         ["A transport protocol."], ["A reliable transport protocol."],
                         cache=cache)  # fmt: skip
    assert again == [1.0] and len(fake_openai["requests"]) == 3
    assert RUBRIC_ID.startswith("tunelab-")


def test_judge_errors_name_the_endpoint(fake_openai, monkeypatch):
    monkeypatch.delenv("TUNELAB_JUDGE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake_openai["replies"] = [404]
    with pytest.raises(TunelabError, match=r"judge-url: .*/v1/chat/completions answered HTTP 404 "
                       r"\(.*model not found"):  # fmt: skip
        judge_scores(fake_openai["url"], "missing", ["q"], ["r"], ["a"])
    assert fake_openai["requests"][0]["auth"] is None  # no key set: no header
    with pytest.raises(TunelabError, match="cannot reach http://127.0.0.1:9/v1"):
        judge_scores("http://127.0.0.1:9/v1", "m", ["q"], ["r"], ["a"], timeout=5)


def test_judge_options_are_checked_before_any_model_loads():
    from tunelab.evaluation.run import _judge, _judge_settings

    with pytest.raises(TunelabError, match="--judge-url .* needs --judge-model"):
        _judge("http://127.0.0.1:8000/v1", None)
    with pytest.raises(TunelabError, match="--judge-model needs --judge-url"):
        _judge(None, "m")
    assert _judge(None, None) is None
    assert _judge_settings("http://x/v1", "m") == {"url": "http://x/v1", "model": "m",
                                                   "rubric": RUBRIC_ID}  # fmt: skip


def test_a_judge_that_cannot_work_is_refused_before_the_evaluation(fake_openai, monkeypatch):
    """The judge was first called after every system's answers: a typo in --judge-url or
    --judge-model stopped the eval only then (or, for a URL without a scheme, as urllib's
    'unknown url type')."""
    from tunelab.evaluation.run import _judge

    monkeypatch.delenv("TUNELAB_JUDGE_API_KEY", raising=False)
    with pytest.raises(TunelabError, match="--judge-url 'notaurl' is not an http"):
        _judge("notaurl", "m")
    fake_openai["replies"] = [404]
    with pytest.raises(TunelabError, match=r"answered HTTP 404 \(.*model not found"):
        _judge(fake_openai["url"], "missing")
    with pytest.raises(TunelabError, match="cannot reach http://127.0.0.1:9/v1"):
        _judge("http://127.0.0.1:9/v1", "m")
    assert _judge(fake_openai["url"], "fake") is not None
    assert len(fake_openai["requests"]) == 2  # one short check per working-looking URL
