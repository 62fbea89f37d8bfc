"""The Lambda function against the real serving container, and `kennel-smoke (kennel_ops/smoke.py)` end to end.

handler -> kennel-local-runtime (kennel_ops/local_runtime.py) (SageMaker runtime API on 127.0.0.1) -> the
kennel-serve container's /invocations, on a model with random weights written
here (a small ONNX CNN and its kennel.json), so that no training run is needed.
"""
from __future__ import annotations

import base64
import io
import json
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kennel_artifact
from docker_cli import REPO, run
from kennel_train.sample import BREEDS, draw_image
from kennel_ops.local_runtime import LocalRuntime

pytestmark = pytest.mark.container

ENDPOINT = "kennel-it"
CLASSES = BREEDS[:5]


def write_random_model(model_dir: Path, class_names: list[str], seed: int = 0) -> Path:
    """A valid kennel model directory: Conv -> ReLU -> global pool -> Gemm, random weights."""
    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "conv_w"),
               numpy_helper.from_array(rng.normal(0, 1.0, (len(class_names), 8)).astype(np.float32), "fc_w"),
               numpy_helper.from_array(rng.normal(0, 0.1, (len(class_names),)).astype(np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", [kennel_artifact.ONNX_INPUT, "conv_w"], ["conv"], strides=[4, 4]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [kennel_artifact.ONNX_OUTPUT], transB=1)]
    graph = helper.make_graph(
        nodes, "random-test-model",
        [helper.make_tensor_value_info(kennel_artifact.ONNX_INPUT, TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info(kennel_artifact.ONNX_OUTPUT, TensorProto.FLOAT, ["N", len(class_names)])],
        weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, model_dir / kennel_artifact.ONNX_FILE)
    kennel_artifact.write_manifest(model_dir, kennel_artifact.Manifest(
        architecture="random-test-cnn", class_names=list(class_names), preprocessing=kennel_artifact.IMAGENET_EVAL))
    for path in model_dir.iterdir():  # the container's unprivileged user reads them
        path.chmod(0o644)
    model_dir.chmod(0o755)
    return model_dir


def sample_jpeg(class_index: int = 0) -> bytes:
    buffer = io.BytesIO()
    draw_image(class_index, random.Random(f"it/{class_index}")).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("model"), CLASSES)


@pytest.fixture(scope="module")
def container(serve_image, model_dir):
    """kennel-serve on the random model, published on a free 127.0.0.1 port; its base URL."""
    name = f"kennel-lambda-it-{uuid.uuid4().hex[:8]}"
    run(["docker", "run", "--detach", "--name", name, "--publish", "127.0.0.1::8080",
         "--volume", f"{model_dir}:/opt/ml/model:ro", serve_image, "serve"], timeout=120)
    try:
        address = "http://" + run(["docker", "port", name, "8080/tcp"], timeout=30).stdout.splitlines()[0].strip()
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{address}/ping", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                logs = run(["docker", "logs", "--tail", "30", name], timeout=30, check=False)
                pytest.fail(f"serve did not answer /ping in 240 s:\n{logs.stdout}{logs.stderr}", pytrace=False)
            time.sleep(0.5)
        yield address
    finally:
        run(["docker", "rm", "--force", name], timeout=60, check=False)


@pytest.fixture
def handler(container, monkeypatch):
    """kennel_lambda.handler wired to the container through the local runtime, as a fresh environment."""
    import kennel_lambda
    with LocalRuntime(container, [ENDPOINT]) as runtime:
        for name, value in {"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": runtime.url, "ENDPOINT_NAME": ENDPOINT,
                            "AWS_ACCESS_KEY_ID": "it", "AWS_SECRET_ACCESS_KEY": "it",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(kennel_lambda, "_client", None)
        monkeypatch.setattr(kennel_lambda, "_plan", None)
        yield kennel_lambda.handler


def post(container: str, body: bytes, content_type: str) -> list:
    request = urllib.request.Request(f"{container}/invocations", data=body, method="POST",
                                     headers={"Content-Type": content_type, "Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def function_url_event(image: bytes, content_type: str, query: dict | None = None) -> dict:
    return {"version": "2.0", "rawPath": "/", "rawQueryString": "&".join(f"{k}={v}" for k, v in (query or {}).items()),
            "queryStringParameters": query, "headers": {"content-type": content_type},
            "requestContext": {"http": {"method": "POST", "path": "/"}},
            "body": base64.b64encode(image).decode(), "isBase64Encoded": True}


# -- the handler against the real container --------------------------------------------------------

def test_default_answer_is_the_containers_scores_unchanged(handler, container):
    image = sample_jpeg(1)
    response = handler({"image": base64.b64encode(image).decode(), "content_type": "image/jpeg"}, None)
    assert response["statusCode"] == 200
    scores = json.loads(response["body"])
    assert np.allclose(scores, post(container, image, "image/jpeg"), rtol=1e-6, atol=1e-6)
    assert len(scores) == 1 and len(scores[0]) == len(CLASSES)


def test_top_k_from_a_function_url_event(handler):
    response = handler(function_url_event(sample_jpeg(2), "image/jpeg", {"top_k": "3"}), None)
    assert response["statusCode"] == 200
    (top,) = json.loads(response["body"])
    assert [entry["class_name"] in CLASSES for entry in top] == [True] * 3
    probabilities = [entry["probability"] for entry in top]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6


def test_the_containers_400_reaches_the_caller_with_its_message(handler):
    response = handler({"image": base64.b64encode(b"these bytes are no image").decode(),
                        "content_type": "image/png"}, None)
    assert response["statusCode"] == 400
    assert "not an image" in json.loads(response["body"])["error"]


def test_the_containers_415_reaches_the_caller(handler):
    response = handler({"image": base64.b64encode(b"a,b\n1,2\n").decode(), "content_type": "text/csv"}, None)
    assert response["statusCode"] == 415
    assert "text/csv" in json.loads(response["body"])["error"]


def test_a_url_into_the_instance_metadata_service_is_refused_by_the_container(handler):
    response = handler({"url": "http://169.254.169.254/latest/meta-data/"}, None)
    assert response["statusCode"] == 400
    assert "metadata" in json.loads(response["body"])["error"]


def test_an_endpoint_the_runtime_does_not_know_is_502(handler, monkeypatch):
    monkeypatch.setenv("ENDPOINT_NAME", "not-deployed")
    response = handler({"url": "https://example.com/dog.jpg"}, None)
    assert response["statusCode"] == 502 and "not-deployed" in json.loads(response["body"])["error"]


# -- kennel-smoke (kennel_ops/smoke.py) (what `make smoke` runs) -----------------------------------------------------

def smoke(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kennel_ops.smoke", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def project_of(output: str) -> str:
    match = re.search(r"compose project (kennel-smoke-[0-9a-f]+)", output)
    assert match, output
    return match.group(1)


def leftovers(project: str) -> str:
    label = f"label=com.docker.compose.project={project}"
    containers = run(["docker", "ps", "--all", "--quiet", "--filter", label], timeout=60).stdout.strip()
    networks = run(["docker", "network", "ls", "--quiet", "--filter", label], timeout=60).stdout.strip()
    return containers + networks


def test_smoke_passes_on_a_model_and_removes_what_it_started(serve_image, model_dir):
    result = smoke("--model-dir", str(model_dir), "--serve-image", serve_image)
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    for form in ("JPEG", "base64 JSON", "URL"):
        assert re.search(rf"smoke: {form} +-> \w", output), output
    assert re.search(r"lambda \{\"image\"\} +-> 200 \[\[", output), output
    assert re.search(r"lambda bad event +-> 400", output), output
    assert output.rstrip().endswith("smoke: OK")
    assert leftovers(project_of(output)) == ""


def test_smoke_without_a_model_fails_in_one_line():
    result = smoke("--model-dir", "/nonexistent/model")
    assert result.returncode == 1
    assert result.stdout.strip().splitlines() == [
        "smoke: FAILED at model: /nonexistent/model does not exist: run `make train` first, or set MODEL_DIR"]


def test_smoke_on_a_model_serve_cannot_load_fails_and_removes_what_it_started(serve_image, tmp_path):
    broken = write_random_model(tmp_path / "model", CLASSES)
    (broken / kennel_artifact.ONNX_FILE).write_bytes(b"not onnx")
    (broken / kennel_artifact.ONNX_FILE).chmod(0o644)
    kennel_artifact.write_manifest(broken, kennel_artifact.read_manifest(broken))  # checksum of the broken file
    (broken / kennel_artifact.MANIFEST_FILE).chmod(0o644)
    result = smoke("--model-dir", str(broken), "--serve-image", serve_image, "--timeout", "180")
    assert result.returncode == 1
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("smoke: FAILED at ping: serve is exited"), result.stdout
    assert leftovers(project_of(result.stdout)) == ""


def test_smoke_stopped_by_sigterm_removes_what_it_started(serve_image, model_dir):
    process = subprocess.Popen([sys.executable, "-m", "kennel_ops.smoke", "--model-dir", str(model_dir),
                                "--serve-image", serve_image], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "compose project" in line:
                break
        time.sleep(0.5)  # inside `docker compose up` (a serve that starts in 2 s is healthy soon after)
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(lines) + rest
    assert process.returncode == 130, output
    assert output.strip().splitlines()[-1] == "smoke: interrupted; what it had started is removed"
    assert leftovers(project_of(output)) == ""
