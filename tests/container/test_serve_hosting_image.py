"""The serving image under the other hosting options' conditions, on a real Docker engine:
a serverless memory size with its CPU share, the SDK's local-mode batch transform, and an
async endpoint's large JSON lines body. Everything is reached through 127.0.0.1 only."""
from __future__ import annotations

import json

import pytest

import serve_support as support
from kennel_ops.aws.deploy import ASYNC_ENV
from test_serve_hosting import LOCAL_MODE_ENV, local_mode_transform_settings
from test_serve_image import PHOTO, Container, containers, model_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.container


def test_serverless_default_size_serves_within_its_memory(serve_image, model_dir, containers):  # noqa: F811
    # deploy --serverless's default 2048 MB, with the CPU share Lambda gives it (1769 MB a vCPU).
    container = Container(serve_image, model_dir, extra=["--memory", "2048m", "--memory-swap", "2048m",
                                                          "--cpus", "1.16"])
    containers.append(container)
    container.wait_ready()
    # Serverless takes requests of up to 4 MB: a photo near that size too.
    big = support.jpeg_bytes((2400, 1800), seed=5, quality=97)
    assert 3_000_000 < len(big) <= 4_000_000
    for payload in [PHOTO] * 20 + [big]:
        reply = container.invoke(payload)
        assert reply.status == 200, reply.body[:300]
    state = container.state()
    assert state["Running"] and not state["OOMKilled"]


def test_local_mode_batch_and_an_async_body(serve_image, model_dir, containers):  # noqa: F811
    container = Container(serve_image, model_dir, env={**ASYNC_ENV, **LOCAL_MODE_ENV})
    containers.append(container)
    container.wait_ready()
    answer = support.http(f"{container.url}/execution-parameters").json()
    assert local_mode_transform_settings(answer)["BatchStrategy"] == "MultiRecord"
    photos = [support.jpeg_bytes((500, 375), seed=seed, quality=95) for seed in range(8)]
    lines = "".join(json.dumps({"image": support.b64(photos[i % 8])}) + "\n" for i in range(120)).encode()
    reply = container.invoke(lines, "application/jsonlines", accept="application/jsonlines", timeout=600)
    assert reply.status == 200, reply.body[:300]
    assert "transfer-encoding" not in reply.headers
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert len(reply.body.decode().splitlines()) == 120
