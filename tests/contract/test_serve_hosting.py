"""What the other hosting options need of the server, over real MMS:

- batch transform through the SageMaker Python SDK's local mode: its transform job takes
  /execution-parameters' BatchStrategy as given and accepts only the API's spelling,
  while the service documents the environment's (kennel_serve.settings.execution_parameters);
- asynchronous inference: large JSON lines bodies (kennel_ops.aws.deploy.ASYNC_ENV's limits),
  and every answer with a Content-Length, none chunked (the async service stores answers
  in S3 whole).

The SDK is not installed here: its check is reproduced from aws/sagemaker-python-sdk
(commit a24812666d25, sagemaker-core/src/sagemaker/core/local/): entities.py
_LocalTransformJob.start (lines 341-353) copies BatchStrategy and MaxPayloadInMB from
the answer when the user gave none, _get_container_environment (lines 397-438) sets
SAGEMAKER_BATCH="True" and SAGEMAKER_MAX_CONCURRENT_TRANSFORMS="1" (and
SAGEMAKER_BATCH_STRATEGY only for a strategy the user gave), and data.py
get_batch_strategy_instance (lines 80-94) raises "Invalid Batch Strategy" for anything
but SingleRecord and MultiRecord. The same code is in the 2.x line (src/sagemaker/local/).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kennel_ops.bench.budget import BUDGET_MIB
from kennel_serve.settings import ServeSettings
from serve_support import ServeProcess, b64, http, jpeg_bytes, plugins, resnet18_base  # noqa: F401

# The container environment local mode gives a transform job that names no strategy.
LOCAL_MODE_ENV = {"SAGEMAKER_BATCH": "True", "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "1"}


def local_mode_transform_settings(execution_parameters: dict, **user_kwargs) -> dict:
    """The SDK local mode's handling of GET /execution-parameters, step for step."""
    kwargs = dict(user_kwargs)
    for setting in ("BatchStrategy", "MaxPayloadInMB"):
        if setting not in kwargs and setting in execution_parameters:
            kwargs[setting] = execution_parameters[setting]
    kwargs.setdefault("BatchStrategy", "MultiRecord")
    kwargs.setdefault("MaxPayloadInMB", 6)
    if kwargs["BatchStrategy"] not in ("SingleRecord", "MultiRecord"):
        raise ValueError('Invalid Batch Strategy: %s - Valid Strategies: "SingleRecord", "MultiRecord"')
    int(kwargs["MaxPayloadInMB"])
    return kwargs


@pytest.mark.parametrize("env, strategy", [
    ({}, "MULTI_RECORD"),  # real-time hosting: the documented answer
    ({"SAGEMAKER_BATCH": "true"}, "MULTI_RECORD"),  # the service's batch transform
    ({"SAGEMAKER_BATCH": "true", "SAGEMAKER_BATCH_STRATEGY": "SINGLE_RECORD"}, "SINGLE_RECORD"),
    (LOCAL_MODE_ENV, "MultiRecord"),  # the SDK's local mode
    ({**LOCAL_MODE_ENV, "SAGEMAKER_BATCH_STRATEGY": "SINGLE_RECORD"}, "SingleRecord"),
])
def test_batch_strategy_is_spelled_for_its_caller(env, strategy):
    answer = json.loads(ServeSettings.from_env(env).execution_parameters(env))
    assert answer["BatchStrategy"] == strategy


@pytest.fixture(scope="module")
def server(resnet18_base, plugins):  # noqa: F811
    from kennel_ops.aws.deploy import ASYNC_ENV
    process = ServeProcess(resnet18_base, plugins, env={**ASYNC_ENV, **LOCAL_MODE_ENV, "KENNEL_URL_FETCH": "false"})
    process.start()
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def test_sdk_local_mode_takes_the_answer_without_a_strategy_given(server):
    answer = http(f"{server.url}/execution-parameters").json()
    assert answer == {"MaxConcurrentTransforms": 1, "BatchStrategy": "MultiRecord", "MaxPayloadInMB": 20}
    assert local_mode_transform_settings(answer) == {"BatchStrategy": "MultiRecord", "MaxPayloadInMB": 20}
    # What failed before: the environment's spelling, as the service documents it.
    with pytest.raises(ValueError, match="Invalid Batch Strategy"):
        local_mode_transform_settings({**answer, "BatchStrategy": "MULTI_RECORD"})


def assert_whole(reply) -> None:
    """A Content-Length that is the body's length, and no chunked transfer."""
    assert "transfer-encoding" not in reply.headers, reply.headers
    assert int(reply.headers["content-length"]) == len(reply.body)


def test_a_large_json_lines_body_is_answered_whole(server):
    photos = [jpeg_bytes((500, 375), seed=seed, quality=95) for seed in range(8)]
    count = 120  # 19.4 MiB
    lines = "".join(json.dumps({"image": b64(photos[i % len(photos)])}) + "\n" for i in range(count)).encode()
    assert len(lines) > 6 * 1024 * 1024  # above the real-time limit, within the async one
    reply = server.invoke(lines, "application/jsonlines", accept="application/jsonlines", timeout=600)
    assert reply.status == 200, reply.body[:300]
    assert_whole(reply)
    answers = reply.body.decode().splitlines()
    assert len(answers) == count and all(json.loads(line)[0] for line in answers)


@pytest.mark.parametrize("path, method, body, content_type, status", [
    ("/ping", "GET", None, None, 200),
    ("/execution-parameters", "GET", None, None, 200),
    ("/execution-parameters", "POST", b"{}", "application/json", 405),
    ("/invocations", "POST", b'{"image": "aGVsbG8="}\n{"image": ', "application/jsonlines", 400),
    ("/invocations", "POST", b"\0" * (21 * 1024 * 1024), "image/jpeg", 413),
    ("/invocations", "POST", b"x", "text/csv", 415),
])
def test_every_answer_carries_a_content_length(server, path, method, body, content_type, status):
    headers = {"Content-Type": content_type} if content_type else {}
    reply = http(f"{server.url}{path}", body, headers, method=method)
    assert reply.status == status, reply.body[:300]
    assert_whole(reply)


def test_a_json_lines_body_at_the_async_limits_stays_within_the_request_budget(resnet18_base):  # noqa: F811
    """123 photos in 19.9 MiB of JSON lines (the most the 20 MiB limit takes): the body, its parsed lines
    and the model inputs of every image, together."""
    entry = Path(__file__).with_name("async_body_entry.py")
    result = subprocess.run([sys.executable, str(entry), str(resnet18_base / "model"), "123"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    row = json.loads(result.stdout.splitlines()[-1])
    assert row["status"] == 200 and 19.5 * 1024 * 1024 < row["bytes"] <= 20 * 1024 * 1024, row
    assert row["peak_mib"] <= BUDGET_MIB, row
