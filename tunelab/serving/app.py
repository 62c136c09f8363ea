"""The HTTP side of ``tunelab serve``: OpenAI routes on FastAPI, run by uvicorn.

Handlers render and tokenize on the event loop, hand a Job to the BatchWorker and wait for its
text; every failure a client can cause is answered with OpenAI's error JSON and status code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.requests import Request

from tunelab.data.tokenize import bos_text
from tunelab.errors import TunelabError
from tunelab.serving.batching import BatchWorker
from tunelab.serving.jobs import Job
from tunelab.serving.models import ModelPool, ServedModel, load_pool
from tunelab.serving.protocol import ChatRequest, CompletionRequest, error_body
from tunelab.template_sandbox import render_chat

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
# how often a waiting non-streaming request checks that its client is still connected
DISCONNECT_POLL_S = 0.25


class RequestError(Exception):
    """A client's mistake, answered with ``status`` and OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: Any = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def build_app(pool: ModelPool, worker: BatchWorker) -> Any:
    """The FastAPI application serving ``pool`` through ``worker``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="tunelab serve", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        body = error_body(exc.message, param=exc.param, code=exc.code)
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where, kinds = _where_and_kinds(first, exc.errors())
        param = ".".join(where) or None
        if first.get("type") == "json_invalid":
            at = first.get("loc", ("body", None))[-1]
            where_in = f" (at character {at + 1})" if isinstance(at, int) else ""  # from 0
            message = f"the request body is not valid JSON{where_in}."
            return JSONResponse(error_body(message), status_code=400)
        if not where and "json" not in request.headers.get("content-type", ""):
            message = (
                "the request body must be a JSON object sent with the header "
                "'Content-Type: application/json' (curl: -H 'Content-Type: application/json'); "
                f"this one came as {request.headers.get('content-type') or 'no content type'}."
            )
        elif kinds:  # a field that takes one of several types got none of them
            given = json.dumps(first.get("input"), default=str)[:80]
            message = f"{param}: {given} is not one of the accepted types ({' or '.join(kinds)})."
        else:
            said = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            message = f"{param or 'body'}: {said}"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        message = f"internal error: {type(exc).__name__}: {exc}"
        return JSONResponse(error_body(message, "server_error"), status_code=500)

    def model_entry(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "tunelab"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_entry(name) for name in pool.served]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:  # the openai client's models.retrieve
        return model_entry(_model(pool, name).name)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        _refuse_unsupported(body)
        served = _model(pool, body.model)
        text = _render_chat(served, body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _answer(request, served, body, text, max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _refuse_unsupported(body)
        served = _model(pool, body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise RequestError(400, "prompt: give one prompt per request.", "prompt")
        return await _answer(request, served, body, prompts[0], body.max_tokens, chat=False)

    async def _answer(
        request: Request,
        served: ServedModel,
        body: Any,
        text: str,
        max_tokens: int | None,
        chat: bool,
    ) -> Any:
        prompt_ids = served.tokenizer(text, add_special_tokens=False).input_ids
        if not prompt_ids:  # nothing to continue from (the model would fail on no input)
            raise RequestError(400, "prompt: it is empty; give the text to continue.", "prompt")
        bos = "" if chat else bos_text(served.tokenizer)
        # a plain prompt starts as each plain text did in training (render_prompt), with one BOS
        if bos and not text.startswith(bos):
            prompt_ids = served.tokenizer(bos + text, add_special_tokens=False).input_ids
        room = pool.context_length - len(prompt_ids)
        where = "messages" if chat else "prompt"
        if room < 1:
            raise RequestError(
                400,
                f"this model's context is {pool.context_length} tokens and the prompt alone has "
                f"{len(prompt_ids)}, leaving no room for an answer. Shorten the prompt.",
                where,
                "context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, room)
        if max_tokens > room:
            raise RequestError(
                400,
                f"this model's context is {pool.context_length} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens asks for {max_tokens}, {room} at most fit. "
                "Shorten the prompt or lower max_tokens.",
                where,
                "context_length_exceeded",
            )
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def send(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(
            served=served,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=0.0 if body.top_p == 0 else body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop_strings(),
            on_text=lambda delta: send("text", delta),
            on_done=lambda *done: send("done", done),
            on_error=lambda message: send("error", message),
        )
        worker.submit(job)
        reply = _Reply(served.name, chat, len(prompt_ids))
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            stream = _stream(events, reply, include_usage, lambda: worker.cancel(job))
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            checked = time.monotonic()
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    kind, value = "wait", None
                if kind == "error":
                    return JSONResponse(error_body(value, "server_error"), status_code=500)
                if kind == "done":
                    return reply.whole(*value)
                # text pieces keep coming while the answer is made, so look at the clock
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():  # the client gave up: free its row
                        worker.cancel(job)
                        return JSONResponse(error_body("client disconnected"), status_code=499)
        except asyncio.CancelledError:  # the server cancelled the handler (shutdown)
            worker.cancel(job)
            raise

    return app


class _Reply:
    """Builds the OpenAI response objects of one request."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int) -> None:
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if chunk and self.chat else kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def whole(self, text: str, finish_reason: str, completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
        else:
            choice = {"text": text, "logprobs": None}
        choice.update(index=0, finish_reason=finish_reason)
        body = self._envelope([choice], chunk=False)
        body["usage"] = self.usage(completion_tokens)
        return body

    def chunk(self, text: str | None, finish_reason: str | None, first: bool) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text is not None else {}
            if first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"delta": delta}
        else:
            choice = {"text": text or "", "logprobs": None}
        choice.update(index=0, finish_reason=finish_reason)
        return self._envelope([choice], chunk=True)


async def _stream(
    events: asyncio.Queue[tuple[str, Any]],
    reply: _Reply,
    include_usage: bool,
    cancel: Callable[[], None],
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, a last chunk with the finish reason,
    the usage chunk if asked for, then ``[DONE]``. If the client goes away first, starlette
    stops this generator and ``cancel`` frees the request's row in the batch."""
    finished = False
    try:
        async for piece in _events(events, reply, include_usage):
            yield piece
        finished = True
    finally:
        if not finished:
            cancel()


async def _events(
    events: asyncio.Queue[tuple[str, Any]], reply: _Reply, include_usage: bool
) -> AsyncIterator[str]:

    def event(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    first = True
    if reply.chat:  # the role comes first, as OpenAI sends it
        yield event(reply.chunk("", None, first=True))
        first = False
    while True:
        kind, value = await events.get()
        if kind == "text":
            yield event(reply.chunk(value, None, first))
            first = False
        elif kind == "error":
            yield event(error_body(value, "server_error"))
            break
        else:
            _, finish_reason, completion_tokens = value
            yield event(reply.chunk(None if reply.chat else "", finish_reason, first))
            if include_usage:
                usage_chunk = reply._envelope([], chunk=True)
                usage_chunk["usage"] = reply.usage(completion_tokens)
                yield event(usage_chunk)
            break
    yield "data: [DONE]\n\n"


def _model(pool: ModelPool, name: str) -> ServedModel:
    served = pool.get(name)
    if served is None:
        raise RequestError(
            404,
            f"the model {name!r} does not exist; this server has {', '.join(pool.served)}.",
            "model",
            "model_not_found",
        )
    return served


def _where_and_kinds(first: Any, errors: Sequence[Any]) -> tuple[list[str], list[str]]:
    """The field path of a validation error, cut before pydantic's union-member tags
    (``content.str``, ``prompt.list[str].0``), and the types that union accepts."""
    where: list[str] = []
    for part in first.get("loc", ()):
        if part == "body":
            continue
        if isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part):
            kinds: list[str] = []
            for error in errors:  # every member of the union that refused the value
                loc = [str(p) for p in error.get("loc", ()) if p != "body"]
                if loc[: len(where)] == where and len(loc) > len(where):
                    kind = loc[len(where)]
                    if kind not in kinds:
                        kinds.append(kind)
            return where, kinds
        where.append(str(part))
    return where, []


def _refuse_unsupported(body: ChatRequest | CompletionRequest) -> None:
    field = body.unsupported()
    if field is not None:
        raise RequestError(
            400,
            f"{field}: tunelab serve does not support it, and would answer as if it were not "
            f"there; leave {field} out (or at its default) of the request.",
            field,
            "unsupported_parameter",
        )


def _render_chat(served: ServedModel, body: ChatRequest) -> str:
    """The prompt text as the run trained: its chat template, its system prompt unless the
    request brings one; a run trained without a template gets the turns one per line."""
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    if not served.chat:
        return "\n".join(m["content"] for m in messages) + "\n"
    if served.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": served.system_prompt})
    try:
        return render_chat(served.tokenizer, messages, add_generation_prompt=True)
    except TunelabError as exc:  # the template's own complaint (e.g. role order) or a limit
        raise RequestError(
            400, f"messages: the model's chat template refused them: {exc}", "messages"
        ) from None


# seconds open responses get to finish once the server is told to stop
GRACE_S = 5


def serve(
    targets: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    precision: str = "fp32",
    max_batch_size: int = 8,
    continuous: bool = True,
) -> None:
    """Load ``targets`` and serve them until interrupted (blocks). ``continuous=False`` runs
    each batch to its end before the next starts (the whole-batch ``generate`` path)."""
    import uvicorn

    if max_batch_size < 1:
        raise TunelabError(f"--max-batch-size is {max_batch_size}; it must be at least 1.")
    check_port_free(host, port)  # before the model loads, which takes a while
    pool = load_pool(targets, precision)
    worker = BatchWorker(pool, max_batch_size, continuous)
    logger.info("Serving %s at http://%s:%s/v1", ", ".join(pool.served), host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach it can use the models.", host)
    logger.info("Ctrl-C stops the server; answers still streaming are cut after %d s.", GRACE_S)
    try:
        # uvicorn waits for open responses on Ctrl-C; a stream as long as the context would
        # keep the server up for minutes without a word
        uvicorn.run(
            build_app(pool, worker),
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=GRACE_S,
        )
    finally:
        worker.stop()


def check_port_free(host: str, port: int) -> None:
    """Raise TunelabError when ``host:port`` cannot be listened on (most often: in use)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise TunelabError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}. Another server probably "
                "uses the port; pick another with --port, or stop that server."
            ) from None
