"""The serving image on a real Docker engine: how it is built, `docker compose up serve`,
SageMaker's `docker run IMAGE serve`, refusing a bad model with one line, draining on
`docker stop`, and restarting. Everything is reached through 127.0.0.1 only."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import serve_support as support
from docker_cli import COMPOSE_FILE, REPO, run
from kennel_ops.aws.images import git_commit
from kennel_ops.ports import free_mms_port

pytestmark = pytest.mark.container

STARTUP_TIMEOUT_S = 240
PHOTO = support.jpeg_bytes((500, 375), seed=11)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random-weight ResNet-18 artifact, readable by the image's unprivileged user."""
    from kennel_ops.bench.models import write_random_model
    directory = tmp_path_factory.mktemp("serve-model") / "model"
    write_random_model(directory, "resnet18", num_classes=5)
    return directory


def model_with_code(tmp_path: Path, model_dir: Path, inference_py: str) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    (copy / "code").mkdir()
    (copy / "code" / "inference.py").write_text(inference_py)
    return copy


class Container:
    """`docker run -d IMAGE serve` published on 127.0.0.1."""

    def __init__(self, image: str, model: Path | None, env: dict[str, str] | None = None, port_in: int = 8080,
                 extra: list[str] | None = None):
        self.name = f"kennel-serve-test-{uuid.uuid4().hex[:8]}"
        self.port = free_mms_port()
        args = ["docker", "run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:{port_in}"]
        if model is not None:
            args += ["-v", f"{model}:/opt/ml/model:ro"]
        for key, value in (env or {}).items():
            args += ["-e", f"{key}={value}"]
        run(args + (extra or []) + [image, "serve"], timeout=120)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.state()["Status"] == "exited":
                pytest.fail(f"serve exited {self.state()['ExitCode']}:\n{self.logs()[-3000:]}", pytrace=False)
            try:
                if support.http(f"{self.url}/ping", timeout=3).status == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"/ping not 200 within {timeout} s:\n{self.logs()[-3000:]}", pytrace=False)

    def state(self) -> dict:
        result = run(["docker", "inspect", "--format", "{{json .State}}", self.name], timeout=60)
        return json.loads(result.stdout)

    def logs(self) -> str:
        result = run(["docker", "logs", self.name], timeout=60, check=False)
        return result.stdout + result.stderr

    def invoke(self, body: bytes, content_type="image/jpeg", accept=None, timeout=60):
        headers = {"Content-Type": content_type, **({"Accept": accept} if accept else {})}
        return support.http(f"{self.url}/invocations", body, headers, method="POST", timeout=timeout)

    def remove(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True, timeout=120)


@pytest.fixture
def containers():
    started: list[Container] = []
    yield started
    for container in started:
        container.remove()


def test_image_is_small_unprivileged_torch_free_and_labelled(serve_image):
    inspect = json.loads(run(["docker", "image", "inspect", serve_image], timeout=60).stdout)[0]
    assert inspect["Size"] <= 1_000_000_000, f"{inspect['Size'] / 1e6:.0f} MB"
    config = inspect["Config"]
    assert config["User"] == "kennel"
    assert config["Labels"]["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    assert config["Labels"]["com.amazonaws.sagemaker.capabilities.multi-models"] == "true"
    assert config["Labels"]["org.opencontainers.image.revision"] == git_commit()  # what the push tags with
    assert config["Entrypoint"][:2] == ["tini", "--"] and config["Cmd"] == ["serve"]
    checks = ("import importlib.util, os, ssl;"
              "assert importlib.util.find_spec('torch') is None, 'torch in the image';"
              "assert not os.path.exists('/tmp/build-ca') and not os.path.exists('/etc/pip.conf'), 'build CA';"
              "assert os.environ['ORT_DISABLE_TELEMETRY'] == '1';"
              "import onnxruntime, sagemaker_inference, mms; print('ok')")
    result = run(["docker", "run", "--rm", "--entrypoint", "python", serve_image, "-c", checks], timeout=120)
    assert result.stdout.strip() == "ok"
    java = run(["docker", "run", "--rm", "--entrypoint", "java", serve_image, "-version"], timeout=120)
    assert 'version "17' in java.stderr


def test_compose_up_serve_answers_on_loopback(serve_image, model_dir, tmp_path):
    from kennel_artifact import decode_image
    from kennel_serve.engine import KennelModel

    port = free_mms_port()
    env = {"KENNEL_SERVE_IMAGE": serve_image, "KENNEL_MODEL_DIR": str(model_dir), "KENNEL_SERVE_PORT": str(port)}
    compose = ["docker", "compose", "--project-name", f"kennel-serve-test-{uuid.uuid4().hex[:8]}",
               "--project-directory", str(tmp_path), "--file", str(COMPOSE_FILE)]
    full_env = {**os.environ, **env}
    try:
        run(compose + ["up", "--detach", "--no-build", "serve"], timeout=300, env=full_env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if support.http(f"{url}/ping", timeout=3).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        reply = support.http(f"{url}/invocations", PHOTO, {"Content-Type": "image/jpeg"}, method="POST")
        assert reply.status == 200, reply.body
        expected = KennelModel.load(model_dir).predict([decode_image(PHOTO)])
        np.testing.assert_allclose(reply.json(), expected, rtol=1e-5, atol=1e-5)
        top = support.http(f"{url}/invocations", json.dumps({"image": support.b64(PHOTO)}).encode(),
                           {"Content-Type": "application/json", "Accept": "application/vnd.kennel.topk+json"},
                           method="POST")
        assert top.status == 200 and top.json()[0][0]["index"] == int(np.argmax(expected))
        started = time.monotonic()
        run(compose + ["stop", "serve"], timeout=120, env=full_env)
        assert time.monotonic() - started < 30
        ps = run(compose + ["ps", "--all", "--format", "json", "serve"], timeout=60, env=full_env).stdout
        assert '"ExitCode":0' in ps.replace(" ", ""), ps
    finally:
        subprocess.run(compose + ["down", "--volumes", "--timeout", "5"], capture_output=True, timeout=300,
                       env=full_env)


@pytest.mark.parametrize("prepare, fragment", [
    (None, "model directory /opt/ml/model does not exist"),
    ("empty", "/opt/ml/model/kennel.json not found: not a kennel model directory"),
    ("original", "/opt/ml/model/kennel.json not found"),
])
def test_an_invalid_model_dir_exits_non_zero_with_one_line(serve_image, tmp_path, prepare, fragment):
    args = ["docker", "run", "--rm"]
    if prepare is not None:
        model = tmp_path / "model"
        model.mkdir()
        if prepare == "original":
            (model / "model.pth").write_bytes(b"a state_dict of the original system")
        args += ["-v", f"{model}:/opt/ml/model:ro"]
    result = run(args + [serve_image, "serve"], timeout=120, check=False)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1 and fragment in lines[0], lines


SLOW_PREDICT = """
import time
from kennel_serve.engine import KennelModel
from kennel_serve.outputs import Prediction

def model_fn(model_dir):
    return KennelModel.load(model_dir)

def predict_fn(images, model):
    time.sleep(4)
    return Prediction(model.predict(images), model.class_names)
"""


def test_docker_stop_drains_in_flight_requests(serve_image, model_dir, tmp_path, containers):
    container = Container(serve_image, model_with_code(tmp_path, model_dir, SLOW_PREDICT))
    containers.append(container)
    container.wait_ready()
    replies = []
    request = threading.Thread(target=lambda: replies.append(container.invoke(PHOTO, timeout=60)))
    request.start()
    time.sleep(1.0)
    started = time.monotonic()
    run(["docker", "stop", "--time", "30", container.name], timeout=60)
    stopped_after = time.monotonic() - started
    request.join(timeout=30)
    assert replies and replies[0].status == 200, replies
    assert container.state()["ExitCode"] == 0
    assert stopped_after < 30, stopped_after


def test_sagemaker_style_run_with_bind_to_port_and_restart(serve_image, model_dir, containers):
    # SageMaker: `docker run IMAGE serve`, the model at /opt/ml/model, /tmp in the container's
    # own filesystem (so it survives a restart, stale MMS pid file included).
    container = Container(serve_image, model_dir, env={"SAGEMAKER_BIND_TO_PORT": "9090"}, port_in=9090)
    containers.append(container)
    container.wait_ready()
    assert container.invoke(PHOTO).status == 200
    run(["docker", "restart", "--time", "30", container.name], timeout=120)
    container.wait_ready()
    assert container.invoke(PHOTO).status == 200
    assert "already running" not in container.logs()
    assert container.state()["Running"]


def test_the_image_serves_the_int8_graph_within_tolerance_and_auto_measures_on_this_cpu(serve_image, tmp_path,
                                                                                     containers):
    """The image's ONNX Runtime runs model.int8.onnx: pinned, within the documented tolerance of
    FP32 (docs/serving.md, INT8); auto, the graph it measured faster, named on every answer."""
    import kennel_artifact
    from kennel_ops.bench.int8 import random_int8_model
    from kennel_serve.engine import KennelModel

    model = random_int8_model(tmp_path / "model", "resnet18", tmp_path, classes=5, calibration_images=40)
    os.chmod(tmp_path, 0o755)  # the image's unprivileged user reads the mount
    fp32 = KennelModel.load(model, precision_setting="fp32").predict([kennel_artifact.decode_image(PHOTO)])
    pinned = Container(serve_image, model, env={"KENNEL_PRECISION": "int8"})
    containers.append(pinned)
    auto = Container(serve_image, model, env={"KENNEL_PRECISION": "auto"})
    containers.append(auto)
    pinned.wait_ready()
    reply = pinned.invoke(PHOTO)
    assert reply.status == 200, reply.body
    assert reply.headers["x-kennel-precision"] == "int8; setting=int8"
    np.testing.assert_allclose(np.asarray(reply.json()), fp32, rtol=0, atol=0.2 * float(np.abs(fp32).max()))

    auto.wait_ready()
    precision, setting, speedup = auto.invoke(PHOTO).headers["x-kennel-precision"].split("; ")
    ratio = float(speedup.removeprefix("speedup="))
    assert setting == "setting=auto" and precision == ("int8" if ratio >= 1.2 else "fp32")
    chosen = [line for line in auto.logs().splitlines() if "(KENNEL_PRECISION=auto:" in line]
    assert len(chosen) == 1 and f"serving the {precision.upper()} graph" in chosen[0], chosen


def test_a_model_of_the_original_system_is_converted_and_answers_like_the_original(serve_image, train_image,
                                                                                   tmp_path, containers):
    """The original's model.tar.gz (only model.pth: ResNet-50 + its head, 133 classes) -> the training
    image's `convert` -> this image: the original's clients get the original's scores."""
    import tarfile

    import torch
    from PIL import Image
    from torchvision import transforms

    from kennel_ops.bench.models import build_network

    torch.manual_seed(3)
    original = build_network("resnet50", 133)  # the original head: Linear(2048,128)-ReLU-Linear(128,133)
    work = tmp_path / "work"
    work.mkdir()
    torch.save(original.cpu().state_dict(), work / "model.pth")
    with tarfile.open(work / "model.tar.gz", "w:gz") as archive:
        archive.add(work / "model.pth", arcname="model.pth")
    (work / "model.pth").unlink()
    os.chmod(work, 0o777)  # the training image writes model/ here as its own user
    run(["docker", "run", "--rm", "-v", f"{work}:/work", train_image, "convert", "--model-tar", "/work/model.tar.gz",
         "--output", "/work/model"], timeout=900)

    container = Container(serve_image, work / "model")
    containers.append(container)
    container.wait_ready()
    reply = container.invoke(PHOTO, "image/jpeg", accept="application/json")
    assert reply.status == 200, reply.body
    scores = np.asarray(reply.json())
    assert scores.shape == (1, 133)
    # What the original endpoint computed: its eval transform (squash to 224x224, no
    # normalisation) and the eager network.
    image = Image.open(io.BytesIO(PHOTO)).convert("RGB")
    with torch.no_grad():
        expected = original(transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])(image)
                            .unsqueeze(0)).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-3 * max(1.0, float(np.abs(expected).max())), rtol=0)
    assert scores.argmax() == expected.argmax()
    top = container.invoke(PHOTO, accept="application/vnd.kennel.topk+json").json()[0][0]
    assert top["index"] == int(expected.argmax()) and top["class_name"].startswith(f"{top['index'] + 1:03d}.")
