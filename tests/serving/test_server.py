"""tunelab serve against the official openai client: the routes, streaming, batching under load
and the error JSON of each bad request; answers equal tunelab generate's."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import spread_weights, tiny_run_config, write_jsonl


def train_run(base: Path, folder: Path, seed: int, system_prompt: str | None = None) -> Path:
    from tunelab.api import FineTuner

    rows = [
        {"prompt": f"What does {term} mean?", "completion": answer}
        for term, answer in [
            ("byte", "Eight bits."),
            ("kernel", "The core of an operating system."),
            ("compiler", "A program that translates source code."),
        ]
    ] * 4
    config = tiny_run_config(
        base,
        write_jsonl(folder.parent / f"{folder.name}.jsonl", rows),
        folder,
        learning_rate=2e-2,
        max_steps=6,
        lora_dropout=0.0,
        dedup_exact=False,
        dedup_near_threshold=None,
        seed=seed,
        system_prompt=system_prompt,
    )
    FineTuner(config).train()
    return folder


@pytest.fixture(scope="session")
def lively_base(tmp_path_factory) -> Path:
    """The tiny model with larger random weights: the shared fixture's answers are all new
    lines, which would make every comparison of answers pass."""
    from conftest import build_tiny_model
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path_factory.mktemp("serve-base") / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    spread_weights(model, seed=1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory, lively_base) -> list[Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    return [
        train_run(lively_base, root / "alpha", seed=1),
        train_run(lively_base, root / "beta", seed=2, system_prompt="Answer briefly."),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """uvicorn serving the app on 127.0.0.1 in a thread; ``url`` is its /v1 base."""

    def __init__(self, targets: list[str], max_batch_size: int = 8) -> None:
        import uvicorn

        from tunelab.serving.app import build_app
        from tunelab.serving.batching import BatchWorker
        from tunelab.serving.models import load_pool

        self.pool = load_pool(targets)
        self.worker = BatchWorker(self.pool, max_batch_size)
        port = free_port()
        config = uvicorn.Config(
            build_app(self.pool, self.worker), host="127.0.0.1", port=port, log_level="error"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        self.root = f"http://127.0.0.1:{port}"
        self.url = f"{self.root}/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.worker.stop()


@pytest.fixture(scope="session")
def live_server(two_runs):
    server = LiveServer([str(run) for run in two_runs])
    yield server
    server.close()


PROMPTS = ["What does byte mean?", "What does kernel mean?", "Define compiler.", "hello"]


@pytest.fixture(scope="session")
def expected(two_runs, lively_base):
    """tunelab generate's greedy answers (8 new tokens) per served name and prompt."""
    from tunelab.generation import generate, load_for_inference

    answers = {}
    for name, target in [("alpha", two_runs[0]), ("beta", two_runs[1]), ("model", lively_base)]:
        loaded = load_for_inference(str(target))
        answers[name] = {p: generate(loaded, [p], max_new_tokens=8)[0] for p in PROMPTS}
    return answers


@pytest.fixture
def client(live_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=live_server.url, api_key="unused", max_retries=0, timeout=120)


def ask(client, model, prompt, **options):
    options.setdefault("max_tokens", 8)
    options.setdefault("temperature", 0)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], **options
    )


def test_models_lists_each_run_and_the_base(client):
    assert sorted(m.id for m in client.models.list().data) == ["alpha", "beta", "model"]


def test_greedy_answers_equal_tunelab_generate(client, expected):
    runs_differ = False
    for name in ("alpha", "beta", "model"):
        for prompt in PROMPTS:
            reply = ask(client, name, prompt)
            assert reply.choices[0].message.content.strip() == expected[name][prompt]
            assert reply.usage.completion_tokens <= 8
            assert reply.usage.total_tokens == (
                reply.usage.prompt_tokens + reply.usage.completion_tokens
            )
        runs_differ |= expected["alpha"] != expected["beta"]
    # the adapters really are switched per request: the three models do not all answer alike
    assert runs_differ or expected["alpha"] != expected["model"]


def test_the_runs_system_prompt_and_template_are_used(live_server, client):
    beta = live_server.pool.get("beta")
    text = beta.tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "hello"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    count = len(beta.tokenizer(text, add_special_tokens=False).input_ids)
    assert ask(client, "beta", "hello").usage.prompt_tokens == count


def test_streaming_sends_the_same_answer_in_pieces(client, expected):
    stream = ask(client, "alpha", PROMPTS[0], stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces).strip() == expected["alpha"][PROMPTS[0]]
    assert len([p for p in pieces if p]) > 1  # streamed, not one block at the end
    assert finish in ("stop", "length") and usage.completion_tokens > 0


def test_completions_continue_raw_text(client, live_server, two_runs):
    from tunelab.generation import generate_from_text, load_for_inference

    loaded = load_for_inference(str(two_runs[0]))
    want = generate_from_text(loaded, ["A byte is"], max_new_tokens=6)[0]
    reply = client.completions.create(
        model="alpha", prompt="A byte is", max_tokens=6, temperature=0
    )
    assert reply.choices[0].text.strip() == want
    streamed = client.completions.create(
        model="alpha", prompt="A byte is", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices).strip() == want


def test_max_tokens_stop_and_seed(client):
    reply = ask(client, "model", "hello", max_tokens=3)
    # the random tiny base does not end its answer within 3 tokens
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (3, "length")
    full = ask(client, "model", "hello", max_tokens=8).choices[0].message.content
    stop = full.strip()[2:4]
    cut = ask(client, "model", "hello", max_tokens=8, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.find(stop)]
    sampled = [
        ask(client, "alpha", "hello", temperature=1.5, seed=7).choices[0].message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_load_8_clients_20_requests_each(client, live_server, expected):
    from concurrent.futures import ThreadPoolExecutor

    live_server.worker.batches.clear()
    names = ["alpha", "beta", "model"]

    def one_client(index):
        wrong = []
        for step in range(20):
            name, prompt = names[(index + step) % 3], PROMPTS[(index * 7 + step) % len(PROMPTS)]
            answer = ask(client, name, prompt).choices[0].message.content.strip()
            if answer != expected[name][prompt]:
                wrong.append((name, prompt, answer))
        return wrong

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one_client, range(8)))
    assert results == [[]] * 8
    assert sum(live_server.worker.batches) == 160
    assert max(live_server.worker.batches) > 1  # waiting requests were generated together


def http(method: str, url: str, data: bytes | None) -> tuple[int, dict]:
    """Status and JSON body of a raw request (the openai client would not send these)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, data=data, method=method.upper(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_each_bad_request_gets_openai_error_json(live_server, client):
    url = live_server.url
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("post", "/chat/completions", {**chat, "model": "nope"}, 404, "model", "model_not_found"),
        ("post", "/chat/completions", {"model": "alpha"}, 400, "messages", None),
        ("post", "/chat/completions", {**chat, "messages": []}, 400, "messages", None),
        ("post", "/chat/completions", {**chat, "temperature": 5}, 400, "temperature", None),
        ("post", "/chat/completions", {**chat, "n": 2}, 400, "n", None),
        ("post", "/chat/completions", {**chat, "max_tokens": 0}, 400, "max_tokens", None),
        (
            "post",
            "/chat/completions",
            {**chat, "messages": [{"role": "wizard", "content": "hi"}]},
            400,
            "messages.0.role",
            None,
        ),
        (
            "post",
            "/chat/completions",
            {**chat, "max_tokens": 5000},
            400,
            "messages",
            "context_length_exceeded",
        ),
        (
            "post",
            "/completions",
            {"model": "alpha", "prompt": "word " * 3000},
            400,
            "prompt",
            "context_length_exceeded",
        ),
        ("post", "/completions", {"model": "alpha", "prompt": ["a", "b"]}, 400, "prompt", None),
        # a field of several accepted types names the field, not pydantic's union member
        ("post", "/completions", {"model": "alpha", "prompt": [1, 2]}, 400, "prompt", None),
        ("post", "/chat/completions", {**chat, "stop": 5}, 400, "stop", None),
        (
            "post",
            "/chat/completions",
            {**chat, "messages": [{"role": "assistant", "content": None}]},
            400,
            "messages.0.content",
            None,
        ),
        ("get", "/nothing", None, 404, None, None),
        ("get", "/chat/completions", None, 405, None, None),
    ]
    for method, path, body, status, param, code in cases:
        data = json.dumps(body).encode() if body is not None else None
        got_status, reply = http(method, url + path, data)
        assert got_status == status, (path, body, reply)
        error = reply["error"]
        assert error["message"] and error["type"] == "invalid_request_error", error
        assert (error["param"], error["code"]) == (param, code), (body, error)
    got_status, reply = http("post", url + "/completions", b'{"model": "alpha", "prompt": [1]}')
    assert reply["error"]["message"] == (
        "prompt: [1] is not one of the accepted types (str or list[str])."
    )
    got_status, reply = http("post", url + "/chat/completions", b"{not json")
    assert got_status == 400 and "not valid JSON" in reply["error"]["message"]
    # the official client raises its typed errors on these bodies, and the server lives on
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(client, "nope", "hi")
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(client, "alpha", "hi", max_tokens=5000)
    assert ask(client, "alpha", "hi").choices[0].message.content is not None


def test_one_model_is_retrieved_by_name(client):
    # the openai client's models.retrieve: GET /v1/models/{id}
    openai = pytest.importorskip("openai")
    assert client.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError, match="does not exist; this server has alpha"):
        client.models.retrieve("nope")


def test_fields_tunelab_cannot_honour_are_refused_not_ignored(live_server, client, expected):
    openai = pytest.importorskip("openai")
    unsupported = {
        "logprobs": True,
        "top_logprobs": 2,
        "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "presence_penalty": 1.5,
        "frequency_penalty": 0.5,
        "logit_bias": {"5": 100},
    }
    for field, value in unsupported.items():
        with pytest.raises(openai.BadRequestError, match=f"{field}: tunelab serve does not"):
            ask(client, "alpha", "hi", **{field: value})
        chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], field: value}
        status, reply = http(
            "post", live_server.url + "/chat/completions", json.dumps(chat).encode()
        )
        assert status == 400, reply
        assert (reply["error"]["param"], reply["error"]["code"]) == (field, "unsupported_parameter")
    for field, value in {"echo": True, "best_of": 3, "suffix": "end", "logprobs": 2}.items():
        with pytest.raises(openai.BadRequestError, match=f"{field}: tunelab serve does not"):
            client.completions.create(model="alpha", prompt="hi", max_tokens=2, **{field: value})
    # the values that ask for nothing (some clients send them on every request) are fine
    prompt = PROMPTS[0]
    harmless = dict(
        logprobs=False, presence_penalty=0, response_format={"type": "text"}, tool_choice="none"
    )
    reply = ask(client, "alpha", prompt, **harmless)
    assert reply.choices[0].message.content.strip() == expected["alpha"][prompt]


def test_null_fields_mean_their_default(live_server, client, expected):
    # OpenAI reads null as "not given"; the openai client sends temperature=None as null
    prompt = PROMPTS[0]
    reply = ask(client, "alpha", prompt, top_p=None, n=None, stream=None, seed=None, stop=None)
    assert reply.choices[0].message.content.strip() == expected["alpha"][prompt]
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body = json.dumps({**chat, "temperature": None, "top_p": None, "n": None}).encode()
    status, reply = http("post", live_server.url + "/chat/completions", body)
    assert status == 200 and reply["choices"][0]["message"]["content"] is not None, reply


def test_content_parts_and_top_p_zero(live_server, client, expected):
    # openai clients send content as a list of text parts; top_p 0 keeps only the top token
    openai = pytest.importorskip("openai")
    prompt = PROMPTS[0]
    parts = [{"type": "text", "text": prompt[:7]}, {"type": "text", "text": prompt[7:]}]
    reply = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content.strip() == expected["alpha"][prompt]
    greedy = ask(client, "alpha", prompt, temperature=1.5, top_p=0, seed=3)
    assert greedy.choices[0].message.content.strip() == expected["alpha"][prompt]
    image = [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]
    with pytest.raises(openai.BadRequestError, match="part 0 is 'image_url'; tunelab serves text"):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": image}])
    chat = {"model": "alpha", "messages": [{"role": "user", "content": image}]}
    status, reply = http("post", live_server.url + "/chat/completions", json.dumps(chat).encode())
    assert (status, reply["error"]["param"]) == (400, "messages.0.content"), reply


def test_serve_refuses_what_it_cannot_serve(two_runs, tmp_path, lively_base, capsys):
    from conftest import build_tiny_model

    from tunelab.cli import main
    from tunelab.errors import TunelabError
    from tunelab.serving.models import load_pool

    other = build_tiny_model(tmp_path / "other-base", vocab_size=300)
    stranger = train_run(other, tmp_path / "stranger", seed=3)
    with pytest.raises(TunelabError, match="different base models"):
        load_pool([str(two_runs[0]), str(stranger)])
    with pytest.raises(TunelabError, match="not both"):
        load_pool([str(two_runs[0]), str(lively_base)])
    twin = tmp_path / "twin" / "alpha"
    twin.parent.mkdir()
    import shutil

    shutil.copytree(two_runs[0], twin)
    with pytest.raises(TunelabError, match="same name 'alpha'"):
        load_pool([str(two_runs[0]), str(twin)])
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["serve", str(two_runs[0]), "--max-batch-size", "0"]) == 2


def worker_job(pool, name: str, prompt: str, max_tokens: int, log: list):
    """A greedy Job for ``name`` rendered as tunelab generate renders ``prompt``; its text and
    end are appended to ``log`` as they happen."""
    from tunelab.generation import render_prompt
    from tunelab.serving.jobs import Job

    served = pool.served[name]
    text = render_prompt(served.tokenizer, prompt, served.chat, served.system_prompt)
    return Job(
        served=served,
        prompt_ids=served.tokenizer(text, add_special_tokens=False).input_ids,
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        seed=None,
        stop=[],
        on_text=lambda delta: log.append((name, "text", delta)),
        on_done=lambda text, reason, tokens: log.append((name, "done", text, reason, tokens)),
        on_error=lambda message: log.append((name, "error", message)),
    )


def wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_requests_join_the_running_batch_and_leave_when_done(live_server, two_runs, expected):
    """Continuous batching: requests that arrive while a long answer is being made join at the
    next step (one of the same adapter in its very batch, one of another adapter beside it),
    finish first, and every answer still equals tunelab generate's."""
    from tunelab.generation import generate, load_for_inference

    long_want = generate(load_for_inference(str(two_runs[0])), ["hello"], max_new_tokens=48)[0]
    worker, log = live_server.worker, []
    long_job = worker_job(live_server.pool, "alpha", "hello", 48, log)
    worker.step_rows.clear()
    worker.submit(long_job)
    wait_until(lambda: long_job.tokens >= 3)
    same = worker_job(live_server.pool, "alpha", "What does kernel mean?", 8, log)
    other = worker_job(live_server.pool, "beta", "What does byte mean?", 8, log)
    worker.submit(same)
    worker.submit(other)
    wait_until(lambda: sum(entry[1] == "done" for entry in log) == 3)
    done = [entry for entry in log if entry[1] == "done"]
    assert [entry[0] for entry in done] == ["alpha", "beta", "alpha"]
    assert done[0][2].strip() == expected["alpha"]["What does kernel mean?"]
    assert done[1][2].strip() == expected["beta"]["What does byte mean?"]
    assert long_job.finish_reason == "length" and long_job.tokens == 48  # it was long
    assert done[2][2].strip() == long_want
    assert 2 in worker.step_rows  # the same-adapter request decoded in the long one's batch


def test_a_client_that_goes_away_frees_its_row(live_server, client, expected):
    """A streaming client that disconnects, and a non-streaming one that times out, are dropped
    from the batch at once; the server goes on answering others."""
    import httpx

    worker = live_server.worker
    body = {  # alpha's answer to it runs the full 1500 tokens (seconds here)
        "model": "alpha",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 1500,
        "temperature": 0,
    }
    before = worker.cancelled
    with httpx.Client(timeout=60) as http_client:
        with http_client.stream(
            "POST", f"{live_server.url}/chat/completions", json={**body, "stream": True}
        ) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            wait_until(lambda: worker.in_flight == 1)
        # the stream is closed: the row leaves long before 1500 tokens could be made
        wait_until(lambda: worker.cancelled == before + 1, seconds=30)
        wait_until(lambda: worker.in_flight == 0, seconds=30)
        with pytest.raises(httpx.ReadTimeout):
            http_client.post(f"{live_server.url}/chat/completions", json=body, timeout=0.5)
        wait_until(lambda: worker.cancelled == before + 2, seconds=30)
        wait_until(lambda: worker.in_flight == 0, seconds=30)
    answer = ask(client, "alpha", "hello").choices[0].message.content.strip()
    assert answer == expected["alpha"]["hello"]


def test_models_the_step_loop_cannot_merge_are_named():
    """Sliding-window caches are not merged by the step loop: such a model is served by the
    whole-batch path, and the reason says so."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.serving.inflight import continuous_unsupported

    def tiny(model_type: str, **extra):
        config = AutoConfig.for_model(
            model_type,
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            **extra,
        )
        return AutoModelForCausalLM.from_config(config)

    assert continuous_unsupported(tiny("llama")) is None
    why = continuous_unsupported(tiny("mistral", sliding_window=32))
    assert why is not None and "DynamicSlidingWindowLayer" in why
    model = tiny("llama")
    model.generation_config.repetition_penalty = 1.3
    assert continuous_unsupported(model) == "its generation config sets repetition_penalty=1.3"


def test_new_user_mistakes_get_a_message_that_says_what_to_do(
    live_server, client, two_runs, capsys
):
    """Found by a new-user break test: curl's -d without a JSON content type, where a JSON
    body breaks, a prompt longer than the context with no max_tokens, an empty stop string, and
    a port already in use (refused before the model loads)."""
    import urllib.request

    from tunelab.cli import main

    url = live_server.url + "/chat/completions"
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    form = urllib.request.Request(url, data=json.dumps(chat).encode(), method="POST")
    form.add_header("content-type", "application/x-www-form-urlencoded")  # curl -d's default
    try:
        urllib.request.urlopen(form, timeout=60)
        raise AssertionError("a form body was accepted")
    except urllib.error.HTTPError as error:
        assert error.code == 400
        message = json.loads(error.read())["error"]["message"]
    assert "Content-Type: application/json" in message
    assert "application/x-www-form-urlencoded" in message
    status, reply = http("post", url, b'{"model": "alpha", "messages": [}')
    assert status == 400
    assert reply["error"]["message"] == "the request body is not valid JSON (at character 33)."
    assert reply["error"]["param"] is None
    long = {"model": "alpha", "messages": [{"role": "user", "content": "word " * 3000}]}
    status, reply = http("post", url, json.dumps(long).encode())
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert "the prompt alone has" in reply["error"]["message"]
    assert "-" not in reply["error"]["message"].split("max_tokens")[0]  # no negative count
    status, reply = http("post", url, json.dumps({**chat, "max_tokens": 5000}).encode())
    assert (
        "2048 tokens; the prompt has 18 and max_tokens asks for 5000, 2030 at most fit"
        in (reply["error"]["message"])
    )
    empty = b'{"model": "alpha", "prompt": ""}'
    status, reply = http("post", live_server.url + "/completions", empty)
    assert (status, reply["error"]["param"]) == (400, "prompt")
    assert reply["error"]["message"] == "prompt: it is empty; give the text to continue."
    empty_stop = ask(client, "alpha", "hello", stop="")
    assert (
        empty_stop.choices[0].message.content.strip()
        == ask(client, "alpha", "hello").choices[0].message.content.strip()
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        began = time.monotonic()
        capsys.readouterr()
        assert main(["serve", str(two_runs[0]), "--port", str(port)]) == 2
    assert time.monotonic() - began < 5  # refused before loading the model
    printed = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use." in printed
    assert "pick another with --port" in printed


def test_the_whole_batch_path_still_answers_as_generate(live_server, expected):
    """--no-continuous-batching (and models the step loop cannot merge) keep the whole-batch
    generate path; its answers still equal tunelab generate's for each adapter."""
    from tunelab.serving.batching import BatchWorker

    worker = BatchWorker(live_server.pool, 8, continuous=False)  # the live one idles meanwhile
    try:
        assert not worker.continuous
        log: list = []
        jobs = [
            worker_job(live_server.pool, name, prompt, 8, log)
            for name in ("alpha", "beta", "model")
            for prompt in PROMPTS[:2]
        ]
        for each in jobs:
            worker.submit(each)
        wait_until(lambda: sum(entry[1] == "done" for entry in log) == len(jobs))
        for each in jobs:
            assert each.text.strip() == expected[each.served.name][PROMPTS[jobs.index(each) % 2]]
        assert worker.step_rows == [] and sum(worker.batches) == len(jobs)
    finally:
        worker.stop()


def test_completions_start_a_plain_prompt_with_bos_as_the_tokenizer_does(lively_base, tmp_path):
    # vLLM and llama.cpp encode a completion's prompt with the tokenizer's BOS in front, and
    # tunelab trains every plain text so; the server continued the bare text instead
    import shutil

    from conftest import bos_adding_tokenizer

    from tunelab.generation import generate_from_text, load_for_inference

    folder = tmp_path / "bos-model"
    shutil.copytree(lively_base, folder)
    bos_adding_tokenizer(lively_base).save_pretrained(folder)
    loaded = load_for_inference(str(folder))
    assert loaded.tokenizer("A byte is")["input_ids"][0] == loaded.tokenizer.bos_token_id
    want = generate_from_text(loaded, [loaded.tokenizer.bos_token + "A byte is"], 6)[0]
    bare = generate_from_text(loaded, ["A byte is"], 6)[0]
    assert want != bare  # the check below can tell them apart
    server = LiveServer([str(folder)])
    try:
        client = pytest.importorskip("openai").OpenAI(
            base_url=server.url, api_key="unused", max_retries=0, timeout=120
        )
        reply = client.completions.create(
            model="bos-model", prompt="A byte is", max_tokens=6, temperature=0
        )
        # a prompt written with its BOS gets no second one (it got two)
        written = client.completions.create(
            model="bos-model",
            prompt=loaded.tokenizer.bos_token + "A byte is",
            max_tokens=6,
            temperature=0,
        )
    finally:
        server.close()
    assert reply.choices[0].text.strip() == want
    assert reply.usage.prompt_tokens == len(loaded.tokenizer("A byte is")["input_ids"])
    assert written.choices[0].text == reply.choices[0].text
    assert written.usage.prompt_tokens == reply.usage.prompt_tokens
