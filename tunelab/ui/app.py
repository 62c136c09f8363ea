"""``tunelab ui``: the whole loop in a local web app (FastAPI + Jinja2 + a little plain JS).

Every page calls the same Python API as the CLI; long work (training, merge, export, eval,
serve) runs as the CLI command in its own process (see ``jobs``). Files are served only from
the folders the user opened; Jinja2 escapes every dataset string.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Query, Request
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.datastructures import UploadFile

from tunelab.errors import TunelabError
from tunelab.run_folder import config_path
from tunelab.ui import forms
from tunelab.ui.jobs import Jobs
from tunelab.ui.runs_view import run_folders, run_state

HERE = Path(__file__).parent
PREVIEW_EXAMPLES = 5
MAX_UPLOAD_MB = 1024  # `tunelab ui --max-upload-mb`: a data file, not a model's weights


class Workspace:
    """What one app holds: the folders the user opened, the config being edited, the jobs it
    started and the models the chat has loaded."""

    def __init__(self, root: Path, max_upload_mb: float = MAX_UPLOAD_MB) -> None:
        self.root = root.resolve()
        self.max_upload_mb = max_upload_mb
        self.folders: list[Path] = [self.root]
        self.config_path = self.root / "tunelab.yaml"
        self.values: dict[str, Any] = {"output_dir": str(self.root / "outputs" / "run")}
        if self.config_path.is_file():
            self.load(self.config_path)
        self.jobs = Jobs(self.root)
        self.models: dict[tuple[str, bool], Any] = {}
        self.model_lock = threading.Lock()

    def load(self, path: Path) -> None:
        from tunelab.config import load_config

        self.values = load_config(path).to_dict()
        self.config_path = path

    def allowed(self, path: str | Path) -> Path:
        """``path`` resolved, if it lies inside a folder the user opened; else refused."""
        resolved = Path(path).expanduser().resolve()
        if any(resolved.is_relative_to(folder) for folder in self.folders):
            return resolved
        raise TunelabError(
            f"{path} is outside the folders opened in this app "
            f"({', '.join(map(str, self.folders))}). Open its folder first."
        )


def create_app(root: str | Path = ".", max_upload_mb: float = MAX_UPLOAD_MB) -> FastAPI:
    """The app over the workspace folder ``root`` (runs, configs and uploads live there);
    an upload larger than ``max_upload_mb`` MiB is refused."""
    if max_upload_mb <= 0:
        raise TunelabError(f"--max-upload-mb is {max_upload_mb}; give a size above 0 (MiB).")
    space = Workspace(Path(root), max_upload_mb)
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.workspace = space
    templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescapes .html
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def same_origin_only(request: Request, call_next: Any) -> Response:
        # another web site open in the same browser may send requests here too: a request
        # that names a foreign origin (a cross-site form or fetch) is refused
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            return JSONResponse(
                {"error": f"requests from {origin} are refused; use the app's own pages."},
                status_code=403,
            )
        return await call_next(request)

    def page(request: Request, name: str, **context: Any) -> Response:
        context.setdefault("error", None)
        return templates.TemplateResponse(
            request, name, {"space": space, "serving": _has_serving(), **context}
        )

    @app.exception_handler(TunelabError)
    async def user_error(request: Request, exc: TunelabError) -> Response:
        if request.url.path.startswith(("/api/", "/files")):
            status = 403 if "outside the folders" in str(exc) else 400
            return JSONResponse({"error": str(exc)}, status_code=status)
        return page(request, "error.html", error=str(exc))

    @app.get("/")
    def home() -> Response:
        return RedirectResponse("/data", status_code=303)

    # --- data ---------------------------------------------------------------------------
    @app.get("/data")
    def data_page(request: Request) -> Response:
        return page(request, "data.html", report=None, path=space.values.get("dataset_path", ""))

    @app.post("/data/open-folder")
    async def open_folder(request: Request) -> Response:
        folder = Path(str((await request.form()).get("folder", ""))).expanduser().resolve()
        if not folder.is_dir():
            raise TunelabError(f"{folder} is not a folder.")
        if folder not in space.folders:
            space.folders.append(folder)
        return RedirectResponse("/data", status_code=303)

    @app.post("/data/inspect")
    async def inspect_data(request: Request) -> Response:
        try:
            # the parser spools a file part to a temporary file in chunks; the bound stops it
            # at the limit, so neither memory nor the disk takes more than that
            async with bounded(request, space.max_upload_mb).form() as form:
                upload = form.get("upload")
                path = str(form.get("path", "")).strip()
                if isinstance(upload, UploadFile) and upload.filename:
                    path = str(_save_upload(space.root / "uploads", upload))
        except TunelabError as exc:
            return page(request, "data.html", report=None, path="", error=str(exc))
        if not path:
            raise TunelabError("Pick a data file: type its path or upload one.")
        data_path = space.allowed(path)
        try:
            report = inspect_report(space, str(data_path))
        except TunelabError as exc:
            return page(request, "data.html", report=None, path=path, error=str(exc))
        space.values["dataset_path"] = str(data_path)
        return page(request, "data.html", report=report, path=str(data_path))

    # --- configure ----------------------------------------------------------------------
    @app.get("/configure")
    def configure_page(request: Request, load: str | None = None) -> Response:
        error = None
        if load:
            try:
                space.load(space.allowed(load))
            except TunelabError as exc:
                error = str(exc)
        return page(
            request,
            "configure.html",
            groups=forms.form_fields(space.values),
            errors={},
            error=error,
            saved=None,
        )

    @app.post("/api/config/check")
    async def check_config(request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        config, errors = forms.check_form(form)
        estimate = None
        if config is not None:
            try:
                estimate = forms.estimate_text(config)
            except TunelabError as exc:
                estimate = f"no estimate: {exc}"
        return JSONResponse({"errors": errors, "estimate": estimate})

    @app.post("/configure")
    async def save_config(request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        target = space.allowed(form.pop("config_path", "") or space.config_path)
        action = form.pop("action", "save")
        replace = form.pop("replace", "") == "on"
        config, errors = forms.check_form(form)
        if config is None:
            return page(
                request,
                "configure.html",
                groups=forms.form_fields(space.values, raw=form),
                errors=errors,
                saved=None,
                error=errors.get("", None),
            )
        space.allowed(config.output_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(forms.config_yaml(config), encoding="utf-8")
        space.values, space.config_path = config.to_dict(), target
        if action == "train":
            extra = ["--overwrite"] if replace else []
            space.jobs.start("train", config.output_dir, ["train", str(target), *extra])
            return RedirectResponse(f"/run?path={_q(config.output_dir)}", status_code=303)
        return page(
            request,
            "configure.html",
            groups=forms.form_fields(space.values),
            errors={},
            saved=str(target),
        )

    # --- train and watch ----------------------------------------------------------------
    @app.get("/runs")
    def runs_page(request: Request) -> Response:
        runs = [run_state(path, space.jobs) for path in run_folders(space.root, space.jobs)]
        return page(request, "runs.html", runs=runs)

    def run_view(request: Request, folder: Path, findings: Any) -> Response:
        """The run page: its state and ship jobs, with the doctor's findings when asked."""
        return page(
            request,
            "run.html",
            run=run_state(folder, space.jobs),
            jobs=_ship_jobs(space, folder),
            findings=findings,
        )

    @app.get("/run")
    def run_page(request: Request, path: str) -> Response:
        return run_view(request, space.allowed(path), None)

    @app.get("/api/run")
    def run_api(path: str) -> Response:
        return JSONResponse(run_state(space.allowed(path), space.jobs))

    @app.post("/api/run/stop")
    def stop_run(path: str) -> Response:
        from tunelab.training.guards import request_stop

        folder = space.allowed(path)
        if space.jobs.stop("train", str(folder)):  # our own child: Ctrl-C's signal
            return JSONResponse({"stopping": True})
        if run_state(folder, space.jobs)["state"] != "running":
            return JSONResponse({"stopping": False, "error": f"{folder.name} is not training."})
        # a run this app did not start (the CLI's): no pid of ours to signal, so a request in
        # its folder that its loop reads at the next step boundary
        request_stop(folder)
        return JSONResponse({"stopping": True})

    @app.post("/api/run/resume")
    def resume_run(path: str) -> Response:
        folder = space.allowed(path)
        config = config_path(folder)
        if not config.is_file():
            raise TunelabError(f"{folder} holds no {config.name}, so there is no run to resume.")
        space.jobs.start("train", str(folder), ["train", str(config), "--resume"])
        return JSONResponse({"started": True})

    # --- judge ----------------------------------------------------------------------------
    @app.get("/doctor")
    def doctor_page(request: Request, path: str) -> Response:
        from tunelab.diagnostics.run_report import diagnose_run

        folder = space.allowed(path)
        return run_view(request, folder, diagnose_run(folder))

    @app.get("/compare")
    def compare_page(request: Request, path: list[str] | None = Query(None)) -> Response:  # noqa: B008
        from tunelab.runs.compare import compare_html
        from tunelab.runs.folders import load_run

        chosen = [space.allowed(p) for p in (path or [])]
        report = compare_html([load_run(p) for p in chosen]) if len(chosen) >= 2 else None
        runs = [str(p) for p in run_folders(space.root, space.jobs)]
        return page(
            request, "compare.html", report=report, runs=runs, chosen=list(map(str, chosen))
        )

    @app.get("/chat")
    def chat_page(request: Request, path: str | None = None) -> Response:
        runs = [
            str(p)
            for p in run_folders(space.root, space.jobs)
            if (p / "adapter_config.json").is_file()
        ]
        return page(request, "chat.html", runs=runs, chosen=path or (runs[0] if runs else ""))

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        from tunelab.generation import load_for_inference, stream_answer

        body = await request.json()
        folder = str(space.allowed(body["path"]))
        tuned = body.get("model") != "base"
        prompt = str(body.get("prompt", ""))
        max_new_tokens = min(int(body.get("max_new_tokens", 64)), 512)
        with space.model_lock:  # one load per model even when both panes ask at once
            key = (folder, tuned)
            if key not in space.models:
                space.models[key] = load_for_inference(folder, use_adapter=tuned)
            loaded = space.models[key]
        return StreamingResponse(
            stream_answer(loaded, prompt, max_new_tokens), media_type="text/plain"
        )

    # --- ship -----------------------------------------------------------------------------
    @app.post("/api/ship")
    def ship(path: str, action: str, limit: int | None = None) -> Response:
        folder = space.allowed(path)
        address = None
        if action == "merge":
            arguments = ["merge", str(folder), str(folder.parent / f"{folder.name}-merged")]
        elif action == "export":
            # a new file each time: an export never replaces a file, the user's or an earlier one
            arguments = ["export", str(folder), "--out", str(_free_path(folder, "f16.gguf"))]
        elif action == "eval":
            if limit is not None and limit < 1:
                raise TunelabError(f"examples to evaluate is {limit}; give 1 or more, or none.")
            arguments = ["eval", str(folder), *(["--limit", str(limit)] if limit else [])]
        elif action == "serve" and _has_serving():
            port = _free_port()
            arguments = ["serve", str(folder), "--host", "127.0.0.1", "--port", str(port)]
            address = f"http://127.0.0.1:{port}/v1"
        else:
            raise TunelabError(f"unknown action {action!r}: merge, export, eval or serve.")
        job = space.jobs.start(action, str(folder), arguments, address=address)
        return JSONResponse({"started": " ".join(job.command[3:])})

    @app.post("/api/ship/stop")
    def stop_ship(path: str, action: str) -> Response:
        return JSONResponse({"stopping": space.jobs.stop(action, str(space.allowed(path)))})

    @app.get("/api/job")
    def job_api(path: str, action: str) -> Response:
        job = space.jobs.get(action, str(space.allowed(path)))
        if job is None:
            return JSONResponse({"state": "none"})
        reply: dict[str, Any] = {"state": job.state, "log": job.log_tail()}
        if job.address is not None:
            # shown once the server answers, not when its process starts (loading takes a while)
            reply["address"] = job.address
            reply["listening"] = job.running and _listening(job.address)
        return JSONResponse(reply)

    # --- files ------------------------------------------------------------------------------
    @app.get("/files")
    def files(path: str) -> Response:
        target = space.allowed(path)
        if not target.is_file():
            return JSONResponse({"error": f"{path} is not a file."}, status_code=404)
        # a page among the user's files runs no script with this app's rights (it could start
        # jobs): a sandboxed, unsniffed response
        headers = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}
        return FileResponse(target, headers=headers)

    return app


def _q(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _has_serving() -> bool:
    return importlib.util.find_spec("tunelab.serving") is not None


def _free_path(folder: Path, suffix: str) -> Path:
    """``folder``/NAME-SUFFIX, or NAME-2-SUFFIX, ... : the first name no file has."""
    target, number = folder / f"{folder.name}-{suffix}", 2
    while target.exists() or target.is_symlink():
        target = folder / f"{folder.name}-{number}-{suffix}"
        number += 1
    return target


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listening(address: str) -> bool:
    """Whether a server accepts connections at ``address`` (http://HOST:PORT/...)."""
    parts = urlsplit(address)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), 0.5):
            return True
    except OSError:
        return False


def _ship_jobs(space: Workspace, folder: Path) -> dict[str, Any]:
    out = {}
    for action in ("merge", "export", "eval", "serve"):
        job = space.jobs.get(action, str(folder))
        if job is not None:
            out[action] = {"state": job.state, "address": job.address}
    return out


FORM_HEADROOM = 4096  # bytes of multipart wrapping allowed beside the file


def bounded(request: Request, max_upload_mb: float) -> Request:
    """``request`` whose body may hold at most ``max_upload_mb`` MiB: a larger declared
    Content-Length is refused before any of it is read, and a body that grows past the limit
    (sent without one) is refused when it does. TunelabError names the limit and the way out."""
    # the multipart form around the file (boundaries, part headers, the path field) is a few
    # hundred bytes: a file of exactly the limit must still pass
    limit = int(max_upload_mb * 2**20) + FORM_HEADROOM

    def too_large() -> TunelabError:
        return TunelabError(
            f"the upload is larger than this app's limit of {max_upload_mb:g} MiB. Type the "
            "file's path instead (files in the opened folders are read where they are), or "
            "start the app with a larger limit: tunelab ui --max-upload-mb N."
        )

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large()
    received = 0

    async def receive() -> Any:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise too_large()
        return message

    return Request(request.scope, receive)


def _save_upload(folder: Path, upload: UploadFile) -> Path:
    """Store an uploaded file under ``folder`` by its base name, never over an existing file."""
    folder.mkdir(parents=True, exist_ok=True)
    name = Path(upload.filename or "data").name or "data"
    target, number = folder / name, 1
    while True:
        try:  # created here, never an existing file or a link's target (O_EXCL: no link followed)
            handle = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:  # a file, folder or (even dangling) link of that name
            target = folder / f"{Path(name).stem}-{number}{Path(name).suffix}"
            number += 1
    with os.fdopen(handle, "wb") as out:
        shutil.copyfileobj(upload.file, out)
    return target


def inspect_report(space: Workspace, data_path: str) -> dict[str, Any]:
    """What ``tunelab data inspect`` and ``data preview`` show, for the page: the summary, the
    report page and the first examples with the tokens the loss covers marked."""
    from tunelab.config import config_from_dict
    from tunelab.data.cli import loss_spans
    from tunelab.data.prepare import format_summary, prepare_examples
    from tunelab.data.report import render_html
    from tunelab.data.tokenize import tokenize_example, uses_chat_template
    from tunelab.models import load_tokenizer, resolve_model

    values = {k: v for k, v in space.values.items() if k not in ("eval_path",)}
    values["dataset_path"] = data_path
    config = config_from_dict(values, source="data inspect")
    tokenizer = load_tokenizer(resolve_model(config.model_name), config.trust_remote_code)
    prepared = prepare_examples(config, tokenizer)
    chat = uses_chat_template(tokenizer, config.chat_format)
    previews = []
    for example in prepared.train[:PREVIEW_EXAMPLES]:
        tokenized = tokenize_example(
            example, tokenizer, config.max_length, chat, config.system_prompt
        )
        previews.append(
            {
                "origin": example.origin,
                "tokens": len(tokenized.input_ids),
                "loss_tokens": tokenized.num_loss_tokens,
                "truncated": tokenized.truncated,
                "spans": loss_spans(tokenizer, tokenized.input_ids, tokenized.labels),
            }
        )
    return {
        "summary": format_summary(prepared.manifest),
        "page": render_html(prepared.manifest),
        "previews": previews,
        "chat": chat,
    }
