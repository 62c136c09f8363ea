"""The stop request a run folder can hold (tunelab ui's Stop on a run it did not start)."""

import json
import time

from tunelab.run_folder import STOP_REQUEST
from tunelab.training.guards import clear_stop_request, request_stop, stop_requested


def test_a_stop_request_is_honoured_only_by_a_run_that_began_before_it(tmp_path):
    before = time.time()
    path = request_stop(tmp_path, by="tunelab ui")
    assert path == tmp_path / STOP_REQUEST
    written = json.loads(path.read_text())
    assert written["by"] == "tunelab ui" and before <= written["requested_at"] <= time.time()
    assert stop_requested(tmp_path, since=before) == "tunelab ui"
    # a training process that began after the request: a leftover, not meant for it
    assert stop_requested(tmp_path, since=written["requested_at"] + 0.001) is None
    clear_stop_request(tmp_path)
    assert not path.exists()
    assert stop_requested(tmp_path, since=0) is None  # no request: no stop


def test_a_file_tunelab_did_not_write_is_neither_obeyed_nor_removed(tmp_path):
    for text in ("my notes", '{"requested_at": 1e12}', '{"format": "tunelab stop request"}',
                 '{"format": "tunelab stop request", "requested_at": "now"}'):  # fmt: skip
        (tmp_path / STOP_REQUEST).write_text(text)
        assert stop_requested(tmp_path, since=0) is None
        clear_stop_request(tmp_path)
        assert (tmp_path / STOP_REQUEST).read_text() == text
