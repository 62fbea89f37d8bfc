"""The engine's two configurations: all CPUs for a request alone, one per worker when others are busy.

KennelModel keeps a session of ``threads`` and, when ``solo_threads`` is larger, a
second one; each request runs on the solo session only while every other worker is
idle (the workers' busy flags in the state dir, kennel_serve.mms_toolkit.activity).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kennel_serve.mms_toolkit.activity import WORKERS_DIR
from kennel_serve.engine import KennelModel
from kennel_serve.request_path import KennelInferenceHandler
from kennel_serve.settings import ServeSettings
from serve_support import resnet18_base  # noqa: F401  (fixture)


def photo(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class Recorder:
    """Wraps KennelModel._run to record which session each forward pass ran on."""

    def __init__(self, monkeypatch):
        self.sessions = []
        original = KennelModel._run

        def run(session, batch):
            self.sessions.append(session)
            return original(session, batch)

        monkeypatch.setattr(KennelModel, "_run", staticmethod(run))


def test_a_request_alone_runs_on_the_solo_session_and_gets_the_same_scores(resnet18_base, monkeypatch):
    busy = {"others": False}
    model = KennelModel.load(Path(resnet18_base) / "model", threads=1, solo_threads=2,
                             others_busy=lambda: busy["others"])
    assert model.solo_session is not None
    assert model.session.get_session_options().intra_op_num_threads == 1
    assert model.solo_session.get_session_options().intra_op_num_threads == 2
    recorder = Recorder(monkeypatch)
    images = [photo(1), photo(2)]
    alone = model.predict(images)
    busy["others"] = True
    crowded = model.predict(images)
    assert recorder.sessions == [model.solo_session, model.session]
    np.testing.assert_allclose(alone, crowded, rtol=1e-4, atol=1e-5)


def test_no_solo_session_when_it_would_not_add_threads(resnet18_base, monkeypatch):
    model = KennelModel.load(Path(resnet18_base) / "model", threads=2, solo_threads=2)
    assert model.solo_session is None
    recorder = Recorder(monkeypatch)
    model.predict([photo(3)])
    assert recorder.sessions == [model.session]


def test_warm_up_runs_both_sessions(resnet18_base, monkeypatch):
    model = KennelModel.load(Path(resnet18_base) / "model", threads=1, solo_threads=2)
    recorder = Recorder(monkeypatch)
    model.warm_up()
    assert recorder.sessions == [model.session, model.solo_session]


def test_the_default_handler_asks_the_other_workers_busy_flags(resnet18_base, tmp_path, monkeypatch):
    monkeypatch.setattr("kennel_env.usable_cpus", lambda: 2)
    settings = ServeSettings.from_env({"KENNEL_SERVE_STATE_DIR": str(tmp_path)})
    assert (settings.workers, settings.ort_threads, settings.solo_threads) == (2, 1, 2)
    model = KennelInferenceHandler(settings).default_model_fn(str(Path(resnet18_base) / "model"))
    flags = tmp_path / WORKERS_DIR
    flags.mkdir()
    (flags / str(os.getpid())).write_bytes(b"1")  # this worker, handling the request
    assert not model.others_busy()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (flags / str(other.pid)).write_bytes(b"1")
        assert model.others_busy()
        (flags / str(other.pid)).write_bytes(b"0")
        assert not model.others_busy()
        (flags / str(other.pid)).write_bytes(b"1")
    finally:
        other.kill()
        other.wait()
    assert not model.others_busy()  # a dead worker's flag does not count


def test_explicit_engine_threads_turn_the_solo_session_off(tmp_path, monkeypatch):
    monkeypatch.setattr("kennel_env.usable_cpus", lambda: 4)
    assert ServeSettings.from_env({"KENNEL_ORT_THREADS": "1"}).solo_threads == 1
    assert ServeSettings.from_env({"SAGEMAKER_MODEL_SERVER_WORKERS": "2"}).solo_threads == 4
    assert ServeSettings.from_env({"KENNEL_ORT_SOLO_THREADS": "3"}).solo_threads == 3
    assert ServeSettings.from_env({"KENNEL_ORT_THREADS": "2", "KENNEL_ORT_SOLO_THREADS": "1"}).solo_threads == 2
