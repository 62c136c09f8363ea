"""tunelab's console messages: notes on stdout, warnings on stderr, once per launch."""

from __future__ import annotations

import logging

import pytest

from tunelab.messages import install_console_handler


@pytest.mark.parametrize(
    ("rank", "shown"),
    [
        ("0", {"a note", "a warning", "an error", "this rank's note"}),
        ("1", {"an error", "this rank's note"}),
    ],
)
def test_other_processes_of_a_launch_show_errors_and_their_own_notes_only(
    rank, shown, monkeypatch, capsys
):
    """Every process of a torchrun launch reads the same config and data: a warning about them
    printed once per process is noise, so only the main process shows notes and warnings."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    install_console_handler()
    logger = logging.getLogger("tunelab.data")
    logger.info("a note")
    logger.warning("a warning")
    logger.error("an error")
    logger.info("this rank's note", extra={"all_ranks": True})
    out, err = capsys.readouterr()
    lines = {line.removeprefix("warning: ") for line in (out + err).splitlines()}
    assert lines == shown
    assert ("warning: a warning" in err) == (rank == "0")


def test_a_single_process_shows_everything(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "3")  # without a launch's WORLD_SIZE, RANK says nothing
    install_console_handler()
    logging.getLogger("tunelab.train").warning("lr is high")
    assert capsys.readouterr().err == "warning: lr is high\n"
