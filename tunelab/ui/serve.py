"""Start the app with uvicorn: 127.0.0.1 unless another host is asked for, with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

from tunelab.errors import TunelabError

logger = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def run_ui(
    folder: str = ".", host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 1024
) -> None:
    """Serve the app for the workspace ``folder`` until Ctrl-C (training runs keep going);
    uploads above ``max_upload_mb`` MiB are refused."""
    try:
        import uvicorn

        from tunelab.ui.app import create_app
    except ImportError as exc:
        raise TunelabError(
            f"tunelab ui needs the 'ui' extra ({exc.name} is missing). Install it with: "
            "pip install 'tunelab[ui]'"
        ) from None
    if not Path(folder).is_dir():
        raise TunelabError(
            f"{folder} is not a folder. Pass the folder that holds your data and runs."
        )
    app = create_app(folder, max_upload_mb)
    if host not in LOCAL_HOSTS:
        logger.warning(
            f"listening on {host}, not only this machine: anyone who can reach port "
            f"{port} can read the files in {Path(folder).resolve()} and start runs. There is no "
            "login."
        )
    shown = "127.0.0.1" if host in LOCAL_HOSTS else host
    logger.info("tunelab ui: http://%s:%s/ (Ctrl-C stops the app, not the runs)", shown, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
