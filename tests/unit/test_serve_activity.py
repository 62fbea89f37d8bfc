"""The workers' activity files and the drain that reads them (kennel_serve.mms_toolkit.activity, .drain)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

from kennel_serve.mms_toolkit import activity
from kennel_serve.mms_toolkit.drain import drain
from kennel_serve.settings import ServeSettings


def test_a_worker_is_busy_only_while_it_handles_a_request(tmp_path):
    worker = activity.WorkerActivity(tmp_path)
    assert activity.busy_workers(tmp_path) == 0
    with worker.busy():
        assert activity.busy_workers(tmp_path) == 1
    assert activity.busy_workers(tmp_path) == 0
    assert (tmp_path / activity.WORKERS_DIR / str(os.getpid())).read_bytes() == b"0"


def test_flags_of_dead_workers_and_stray_files_do_not_count(tmp_path):
    flags = tmp_path / activity.WORKERS_DIR
    flags.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (flags / str(gone.pid)).write_bytes(b"1")
    (flags / "not-a-pid").write_bytes(b"1")
    assert activity.busy_workers(tmp_path) == 0


def test_a_busy_flag_that_cannot_be_written_never_fails_the_request(tmp_path):
    (tmp_path / activity.WORKERS_DIR).write_text("a file where the directory should be")
    with activity.WorkerActivity(tmp_path).busy():
        pass


def test_a_load_failure_is_one_line_for_the_launcher(tmp_path):
    assert activity.read_failure(tmp_path) is None
    activity.report_failure(tmp_path, "worker 7 could not load the model: no room\n")
    assert activity.read_failure(tmp_path) == "worker 7 could not load the model: no room"
    assert [p.name for p in tmp_path.iterdir()] == [activity.FAILURE_FILE]  # the temporary file is gone


def settings(tmp_path, timeout_s: float) -> ServeSettings:
    return ServeSettings(model_dir=tmp_path, state_dir=tmp_path, drain_timeout_s=timeout_s)


def test_drain_waits_for_busy_workers_and_fails_ping_first(tmp_path, caplog):
    worker = activity.WorkerActivity(tmp_path)
    request = worker.busy()
    request.__enter__()
    finished = threading.Event()
    draining_while_busy = []

    def finish_the_request() -> None:
        draining_while_busy.append((tmp_path / activity.DRAINING_FILE).exists())
        finished.set()
        request.__exit__(None, None, None)

    timer = threading.Timer(0.3, finish_the_request)
    timer.start()
    with caplog.at_level(logging.WARNING):
        drain(settings(tmp_path, timeout_s=20))
    timer.join()
    assert finished.is_set()  # drain returned only after the request was done
    assert draining_while_busy == [True]  # /ping said 503 while the request was still in flight
    assert "drain timeout" not in caplog.text


def test_drain_gives_up_at_its_timeout(tmp_path, caplog):
    request = activity.WorkerActivity(tmp_path).busy()
    request.__enter__()
    try:
        with caplog.at_level(logging.WARNING):
            drain(settings(tmp_path, timeout_s=0.2))
        assert "drain timeout (0.2 s): stopping with requests still in flight" in caplog.text
    finally:
        request.__exit__(None, None, None)
