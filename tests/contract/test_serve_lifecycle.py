"""`serve` from start to stop: refusing to start with one line, an honest /ping, fail-fast
workers, draining on SIGTERM, restarting cleanly. Real launcher, real MMS, real signals."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

import kennel_artifact
from serve_support import (PYTHONPATH, REPO, ServeProcess, base_with_code, http, jpeg_bytes, plugins,  # noqa: F401
                           resnet18_base)

PHOTO = jpeg_bytes((500, 375), seed=7)


def run_serve(base, plugins_dir, tmp_path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": PYTHONPATH, "SAGEMAKER_BASE_DIR": str(base),
                "KENNEL_MMS_PLUGINS": str(plugins_dir), "KENNEL_SERVE_STATE_DIR": str(tmp_path / "state"),
                "KENNEL_BIND_ADDRESS": "127.0.0.1", "SAGEMAKER_BIND_TO_PORT": "9", **env}
    return subprocess.run([sys.executable, "-m", "kennel_serve", "serve"], env=full_env, capture_output=True,
                          text=True, timeout=120, cwd=str(REPO))


def copy_model(resnet18_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(resnet18_base / "model", base / "model")
    return base


def no_manifest(model):
    (model / kennel_artifact.MANIFEST_FILE).unlink()


def bad_json(model):
    (model / kennel_artifact.MANIFEST_FILE).write_text("{not json")


def replaced_onnx(model):
    with open(model / kennel_artifact.ONNX_FILE, "ab") as fh:
        fh.write(b"tampered")


def garbage_onnx(model):
    (model / kennel_artifact.ONNX_FILE).write_bytes(b"\x08\x07garbage, not a protobuf")
    kennel_artifact.write_manifest(model, kennel_artifact.read_manifest(model))  # checksum matches the garbage


def fewer_classes(model):
    manifest = kennel_artifact.read_manifest(model)
    manifest.class_names = manifest.class_names[:3]
    kennel_artifact.write_manifest(model, manifest)


@pytest.mark.parametrize("damage, fragment", [
    (no_manifest, "kennel.json not found: not a kennel model directory"),
    (bad_json, "kennel.json is not valid JSON"),
    (replaced_onnx, "does not match the checksum"),
    (garbage_onnx, "cannot be loaded by ONNX Runtime"),
    (fewer_classes, "gives 5 scores per image, but kennel.json names 3 classes"),
], ids=["no-manifest", "bad-json", "checksum", "garbage-onnx", "class-count"])
def test_an_invalid_model_ends_serve_with_one_line(resnet18_base, plugins, tmp_path, damage, fragment):
    base = copy_model(resnet18_base, tmp_path)
    damage(base / "model")
    result = run_serve(base, plugins, tmp_path)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("kennel-serve: cannot serve ") and fragment in lines[0], lines[0]


@pytest.mark.parametrize("with_model, env, fragment", [
    (False, {}, "model directory {base}/model does not exist"),
    (True, {"SAGEMAKER_MODEL_SERVER_WORKERS": "lots"}, "SAGEMAKER_MODEL_SERVER_WORKERS='lots' is not a whole number"),
    (True, {"KENNEL_MMS_PLUGINS": "/nonexistent"}, "KENNEL_MMS_PLUGINS=/nonexistent holds no kennel-mms-plugin.jar"),
], ids=["no-model-dir", "bad-setting", "no-plugin"])
def test_missing_model_or_bad_settings_end_serve_with_one_line(resnet18_base, plugins, tmp_path, with_model, env,
                                                                fragment):
    base = copy_model(resnet18_base, tmp_path) if with_model else tmp_path / "empty-base"
    base.mkdir(exist_ok=True)
    result = run_serve(base, plugins, tmp_path, **env)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert fragment.format(base=base) in lines[0]


def test_a_failing_user_model_fn_ends_serve_with_one_line(resnet18_base, plugins, tmp_path):
    base = base_with_code(tmp_path, resnet18_base, "def model_fn(model_dir):\n"
                                                   "    raise RuntimeError('weights for the\\nwrong network')\n")
    result = run_serve(base, plugins, tmp_path)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert "cannot serve" in lines[0] and "weights for the wrong network" in lines[0]


SLOW_WORKER_WARMUP = """
import os, time
from kennel_serve.engine import KennelModel

def model_fn(model_dir):
    return KennelModel.load(model_dir)

def model_warmup_fn(model_dir, model):
    if os.environ.get("KENNEL_EXECUTION_PARAMETERS"):  # set for MMS's workers, not for the launcher's check
        time.sleep(4)
    model.warm_up()
"""


def test_ping_is_200_only_after_a_worker_loaded_and_warmed_up(resnet18_base, plugins, tmp_path):
    base = base_with_code(tmp_path, resnet18_base, SLOW_WORKER_WARMUP)
    server = ServeProcess(base, plugins).start()
    try:
        seen = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server.process.poll() is None:
            status = server.ping()
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == 200:
                break
            time.sleep(0.05)
        # Nothing listens while the launcher checks the model; then MMS binds and says 503
        # until the (slow) worker warm-up is done; then 200.
        assert seen[0] is None and 503 in seen and seen[-1] == 200, seen
        assert seen.index(503) < seen.index(200) and 200 not in seen[:-1], seen
        reply = http(f"{server.url}/ping")
        assert reply.json() == {"status": "Healthy"}
        assert server.invoke(PHOTO).status == 200
    finally:
        server.stop()


def test_a_worker_that_cannot_load_the_model_stops_serve(resnet18_base, plugins, tmp_path):
    inference = ("import os\nfrom kennel_serve.engine import KennelModel\n"
                 "def model_fn(model_dir):\n"
                 "    if os.environ.get('KENNEL_EXECUTION_PARAMETERS'):\n"
                 "        raise MemoryError('no room for a second copy')\n"
                 "    return KennelModel.load(model_dir)\n")
    server = ServeProcess(base_with_code(tmp_path, resnet18_base, inference), plugins)
    server.start()
    try:
        code = server.process.wait(timeout=180)
        last = server.log().strip().splitlines()[-1]
        assert code == 1
        assert last.startswith("kennel-serve: worker ") and "could not load the model: no room for a second copy" in last
        assert server.ping() is None  # MMS is gone too
    finally:
        server.stop()


SLOW_PREDICT = """
import time
from kennel_serve.engine import KennelModel
from kennel_serve.outputs import Prediction

def model_fn(model_dir):
    return KennelModel.load(model_dir)

def predict_fn(images, model):
    time.sleep(3)
    return Prediction(model.predict(images), model.class_names)
"""


def mms_processes(state_dir):
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(state_dir) in part for part in process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_sigterm_drains_in_flight_requests_and_exits_within_30_s(resnet18_base, plugins, tmp_path):
    base = base_with_code(tmp_path, resnet18_base, SLOW_PREDICT)
    server = ServeProcess(base, plugins).start().wait_ready()
    state_dir = server.state_dir
    try:
        assert mms_processes(state_dir), "the MMS processes should be found by their state dir"
        replies = []
        request = threading.Thread(target=lambda: replies.append(server.invoke(PHOTO, timeout=60)))
        request.start()
        time.sleep(1.0)  # the request is inside predict_fn now
        started = time.monotonic()
        server.process.send_signal(15)
        time.sleep(0.5)
        draining = http(f"{server.url}/ping")
        code = server.process.wait(timeout=40)
        elapsed = time.monotonic() - started
        request.join(timeout=30)
        assert draining.status == 503 and "draining" in draining.json()["reason"]
        assert code == 0 and elapsed < 30, (code, elapsed)
        assert replies and replies[0].status == 200, replies
        assert np.shape(replies[0].json()) == (1, 5)
        time.sleep(0.5)
        assert not mms_processes(state_dir), "no JVM or Python worker may outlive serve"
        assert server.ping() is None
    finally:
        server.stop()


def test_restart_finds_no_stale_state(resnet18_base, plugins, tmp_path):
    server = ServeProcess(resnet18_base, plugins)
    # What a killed server leaves behind: MMS's pid file naming a live process (here: this one).
    (server.state_dir / "tmp").mkdir(parents=True)
    (server.state_dir / "tmp" / ".model_server.pid").write_text(str(os.getpid()))
    (server.state_dir / "failed").write_text("an old failure\n")
    try:
        server.start().wait_ready()
        assert server.invoke(PHOTO).status == 200
        assert server.terminate() == 0
        server.start().wait_ready()  # same state dir, same port
        assert server.invoke(PHOTO).status == 200
        assert json.loads(http(f"{server.url}/execution-parameters").body)["MaxConcurrentTransforms"] == 1
    finally:
        server.stop()


STUCK_ON_REQUEST = """
import time
from kennel_serve.engine import KennelModel
from kennel_serve.outputs import Prediction

def model_fn(model_dir):
    return KennelModel.load(model_dir)

def predict_fn(images, model):
    if images[0].size == (64, 64):  # the "stuck" request
        time.sleep(30)
    return Prediction(model.predict(images), model.class_names)
"""


def test_a_stuck_request_is_cut_after_the_model_server_timeout(resnet18_base, plugins, tmp_path):
    base = base_with_code(tmp_path, resnet18_base, STUCK_ON_REQUEST)
    server = ServeProcess(base, plugins, env={"SAGEMAKER_MODEL_SERVER_TIMEOUT": "3"}).start().wait_ready()
    try:
        started = time.monotonic()
        reply = server.invoke(jpeg_bytes((64, 64)), timeout=60)
        elapsed = time.monotonic() - started
        assert reply.status >= 500 and elapsed < 15, (reply.status, elapsed)  # 3 s, not MMS's 60 minutes
        assert "Traceback" not in reply.body.decode(errors="replace")
        server.wait_ready(timeout=120)  # MMS replaced the worker; it loaded and warmed up again
        assert server.invoke(PHOTO).status == 200
    finally:
        server.stop()


def test_workers_also_load_without_mms_preload(resnet18_base, plugins):
    # serve has MMS preload (imports shared by the forked workers); an operator may turn that
    # off through MMS's own variable, and every worker then loads on its own.
    server = ServeProcess(resnet18_base, plugins, env={"MMS_PRELOAD_MODEL": "false",
                                                       "SAGEMAKER_MODEL_SERVER_WORKERS": "2"}).start()
    try:
        server.wait_ready()
        assert "Preload model: false" in server.log()
        assert all(server.invoke(PHOTO).status == 200 for _ in range(4))
    finally:
        server.stop()
