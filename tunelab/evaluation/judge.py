"""An optional LLM judge: any OpenAI-compatible chat endpoint grades each answer by a rubric.

Off by default (it needs a server and may cost money). ``tunelab eval --judge-url URL
--judge-model NAME`` sends one request per distinct (question, reference, answer) to
``URL/chat/completions`` (the OpenAI API's shape, which vLLM, llama.cpp's server, Ollama and
the hosted APIs all serve) with ``RUBRIC`` as the system message and temperature 0, reads the
grade 1-5 from the reply and scores it (grade - 1) / 4 in [0, 1]. The API key, if the server
needs one, comes from $TUNELAB_JUDGE_API_KEY (else $OPENAI_API_KEY) and is never written to the
report; the report names the endpoint, the model and ``RUBRIC_ID``.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from tunelab.errors import TunelabError

RUBRIC_ID = "tunelab-reference-grade-v1"
# published in docs/fine-tuning-vs-prompting-vs-rag.md; a change gets a new RUBRIC_ID
RUBRIC = """You grade an answer against a reference answer written by an expert.
Judge only whether the answer states the same facts as the reference; ignore style, length and
wording. Reply with one digit and nothing else:
5 - every fact of the reference is stated correctly, nothing false is added;
4 - the main fact is correct, a detail is missing or slightly off;
3 - partly correct: some facts right, others missing or wrong;
2 - mostly wrong, with one correct element;
1 - wrong, unrelated, or empty."""
_GRADE = re.compile(r"[1-5]")


def judge_request(model: str, question: str, reference: str, answer: str) -> dict[str, Any]:
    """The JSON body of one grading request (OpenAI chat-completions shape)."""
    return {
        "model": model,
        "temperature": 0,
        "max_tokens": 4,
        "messages": [
            {"role": "system", "content": RUBRIC},
            {
                "role": "user",
                "content": f"Question:\n{question}\n\nReference answer:\n{reference}\n\n"
                f"Answer to grade:\n{answer}\n\nGrade (1-5):",
            },
        ],
    }


def parse_grade(reply: dict[str, Any]) -> float | None:
    """The score in [0, 1] from a chat-completions reply, or None when it holds no grade."""
    try:
        content = reply["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return None
    match = _GRADE.search(content)
    return None if match is None else (int(match.group()) - 1) / 4


def _post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    key = os.environ.get("TUNELAB_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return json.loads(response.read().decode())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:200]
        raise TunelabError(
            f"--judge-url: {url} answered HTTP {exc.code} ({detail.strip() or exc.reason}). "
            "Check the URL (it ends where /chat/completions is added, e.g. "
            "http://127.0.0.1:8000/v1), --judge-model and $TUNELAB_JUDGE_API_KEY."
        ) from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise TunelabError(
            f"--judge-url: cannot reach {url} ({getattr(exc, 'reason', exc)}). Start the "
            "OpenAI-compatible server or drop --judge-url."
        ) from exc
    except json.JSONDecodeError as exc:
        raise TunelabError(f"--judge-url: {url} did not answer with JSON ({exc}).") from exc


def check_endpoint(url: str, model: str, timeout: float = 15.0) -> None:
    """Refuse a judge that cannot work before the evaluation's minutes: a URL that is not
    http(s), an endpoint that does not answer, or a model it does not serve (one short
    grading request). Raises TunelabError naming the URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise TunelabError(
            f"--judge-url {url!r} is not an http(s) URL. Give the OpenAI-compatible endpoint's "
            "base, e.g. http://127.0.0.1:8000/v1."
        )
    judge_scores(url, model, ["What is 2 + 2?"], ["4"], ["Four."], timeout=timeout)


def judge_scores(
    url: str,
    model: str,
    questions: list[str],
    references: list[str],
    answers: list[str],
    timeout: float = 60.0,
    cache: dict[tuple[str, str, str], float | None] | None = None,
) -> list[float | None]:
    """One judge score in [0, 1] per answer (None where the reply held no grade). ``cache``
    keeps grades across calls, so an answer two systems share is graded once."""
    endpoint = url.rstrip("/") + "/chat/completions"
    cache = {} if cache is None else cache
    scores: list[float | None] = []
    for question, reference, answer in zip(questions, references, answers, strict=True):
        key = (question, reference, answer)
        if key not in cache:
            if not answer.strip():
                cache[key] = 0.0  # an empty answer is grade 1 without asking
            else:
                body = judge_request(model, question, reference, answer)
                cache[key] = parse_grade(_post(endpoint, body, timeout))
        scores.append(cache[key])
    return scores
