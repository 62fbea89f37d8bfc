"""A multi-model endpoint on the host, as SageMaker drives it: `serve` with SAGEMAKER_MULTI_MODEL=true, real MMS.

Three real models (random weights, generated here): a and b were trained on one
frozen backbone and share it, c was not. The answers are compared with the same
models served on single-model endpoints.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

import kennel_artifact
from kennel_artifact import Preprocessing
from kennel_ops.bench.models import write_random_model
from serve_support import ServeProcess, b64, http, jpeg_bytes, plugins  # noqa: F401

SMALL = Preprocessing(resize=72, center_crop=64, mean=kennel_artifact.IMAGENET_MEAN, std=kennel_artifact.IMAGENET_STD)
PHOTO = jpeg_bytes((120, 90), seed=4)
JSON_ANSWER = "application/json"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mme")
    return {"a": write_random_model(root / "a" / "model", num_classes=5, preprocessing=SMALL, seed=0, head_seed=1,
                                    split=True),
            "b": write_random_model(root / "b" / "model", num_classes=7, preprocessing=SMALL, seed=0, head_seed=2,
                                    split=True),
            "c": write_random_model(root / "c" / "model", num_classes=4, preprocessing=SMALL, seed=3)}


@pytest.fixture(scope="module")
def server(tmp_path_factory, plugins, models):  # noqa: F811
    process = ServeProcess(tmp_path_factory.mktemp("mme-base"), plugins,
                           {"SAGEMAKER_MULTI_MODEL": "true", "SAGEMAKER_MODEL_SERVER_WORKERS": "2"})
    try:
        yield process.start().wait_ready()
    finally:
        process.stop()


def load(server, name: str, url: Path | str):
    return http(f"{server.url}/models", json.dumps({"model_name": name, "url": str(url)}).encode(),
                {"Content-Type": "application/json"}, method="POST")


def invoke(server, name: str, body: bytes = PHOTO, headers: dict | None = None):
    return http(f"{server.url}/models/{name}/invoke", body,
                {"Content-Type": "image/jpeg", "Accept": JSON_ANSWER, **(headers or {})}, method="POST")


def single_model_answers(plugins, model_dir: Path, requests: list[tuple[bytes, dict]]) -> list:  # noqa: F811
    """What a single-model endpoint of ``model_dir`` answers to each request."""
    process = ServeProcess(model_dir.parent, plugins)
    try:
        process.start().wait_ready()
        replies = [process.invoke(body, headers=headers, content_type=None) for body, headers in requests]
        assert [reply.status for reply in replies] == [200] * len(requests), [reply.body for reply in replies]
        return [reply.json() if reply.headers["content-type"] == JSON_ANSWER else reply.body.decode()
                for reply in replies]
    finally:
        process.stop()


def test_load_list_describe_invoke_unload_and_reload(server, models):
    for name in ("a", "b", "c"):
        reply = load(server, name, models[name])
        assert (reply.status, reply.json()) == (200, {"status": f"model {name} loaded"}), reply.body
    assert load(server, "a", models["a"]).status == 409
    assert load(server, "a", models["a"]).json() == {"error": "model a is already loaded"}

    first = http(f"{server.url}/models?page_size=2").json()
    assert [m["modelName"] for m in first["models"]] == ["a", "b"]
    rest = http(f"{server.url}/models?page_size=2&next_page_token={first['nextPageToken']}").json()
    assert rest == {"models": [{"modelName": "c", "modelUrl": str(models["c"])}]}
    assert http(f"{server.url}/models/b").json() == {"modelName": "b", "modelUrl": str(models["b"])}
    assert http(f"{server.url}/models/zz").status == 404

    for name, classes in (("a", 5), ("b", 7), ("c", 4), ("a", 5), ("b", 7), ("c", 4)):  # both workers, as it falls
        reply = invoke(server, name)
        assert reply.status == 200, reply.body
        assert len(reply.json()[0]) == classes
    assert invoke(server, "zz").status == 404

    holders = len(re.findall(r"worker \d+ loaded model a ", server.log()))  # the workers that loaded it so far
    reply = http(f"{server.url}/models/a", method="DELETE")
    assert (reply.status, reply.json()) == (200, {"status": "model a unloaded"})
    assert http(f"{server.url}/models/a", method="DELETE").status == 404
    assert invoke(server, "a").status == 404
    assert [m["modelName"] for m in http(f"{server.url}/models").json()["models"]] == ["b", "c"]
    assert load(server, "a", models["a"]).status == 200  # and back
    assert invoke(server, "a").status == 200
    # every worker that held the unloaded model dropped it
    deadline = time.monotonic() + 10
    while len(re.findall(r"worker \d+ unloaded model a", server.log())) < holders and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(re.findall(r"worker \d+ unloaded model a", server.log())) == holders >= 1, server.log()[-3000:]


def test_answers_equal_the_single_model_endpoints_in_every_format(server, models, plugins):  # noqa: F811
    for name in ("a", "b", "c"):
        if load(server, name, models[name]).status not in (200, 409):
            pytest.fail(f"cannot load {name}")
    requests = [
        (PHOTO, {"Content-Type": "image/jpeg", "Accept": JSON_ANSWER}),
        (json.dumps({"image": b64(PHOTO)}).encode(), {"Content-Type": "application/json"}),
        (json.dumps({"images": [b64(PHOTO), b64(jpeg_bytes((64, 80), seed=2))]}).encode(),
         {"Content-Type": "application/json", "Accept": "application/jsonlines"}),
        (PHOTO, {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "top_k=2",
                 "X-Amzn-SageMaker-Target-Model": "dogs-a.tar.gz"}),
    ]
    for name in ("a", "c"):
        expected = single_model_answers(plugins, models[name], requests)
        for (body, headers), want in zip(requests, expected):
            reply = http(f"{server.url}/models/{name}/invoke", body, headers, method="POST")
            assert reply.status == 200, reply.body
            if isinstance(want, str):  # JSON lines: one JSON document a line
                got = [json.loads(line) for line in reply.body.decode().splitlines()]
                want = [json.loads(line) for line in want.splitlines()]
            else:
                got = reply.json()
            assert_close(got, want)


def assert_close(got, want) -> None:
    """Equal structures; numbers equal to float32 rounding (the split graph sums in another order)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want)
        for key in want:
            assert_close(got[key], want[key])
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_close(g, w)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    else:
        assert got == want


def test_client_mistakes_are_clear_4xx_and_only_the_contracts_routes_exist(server, models, tmp_path):
    assert load(server, "b", models["b"]).status in (200, 409)
    bad_loads = [
        (b"not json", 400, "the body must be a JSON object"),
        (b'{"model_name": "x"}', 400, "url must name the model's directory"),
        (json.dumps({"model_name": "../x", "url": str(models["a"])}).encode(), 400, "model_name must be"),
        (json.dumps({"model_name": "x", "url": str(tmp_path / "missing")}).encode(), 400, "url must name"),
        (json.dumps({"model_name": "x", "url": str(tmp_path)}).encode(), 400, "cannot load model x: .*not found"),
    ]
    for body, status, message in bad_loads:
        reply = http(f"{server.url}/models", body, {"Content-Type": "application/json"}, method="POST")
        assert reply.status == status and re.search(message, reply.json()["error"]), reply.body
    assert http(f"{server.url}/models/x").status == 404  # a failed load leaves nothing behind

    reply = invoke(server, "b", body=b"not an image")
    assert reply.status == 400 and "error" in reply.json()
    for method, path, status in (("PUT", "/models/b", 405), ("GET", "/models/b/invoke", 405),
                                 ("POST", "/models/b/predict", 404), ("POST", "/invocations", 404),
                                 ("GET", "/predictions/model", 404), ("POST", "/models/b?min_worker=3", 405)):
        reply = http(f"{server.url}{path}", b"" if method in ("POST", "PUT") else None, method=method)
        assert reply.status == status, (method, path, reply.body)
        assert "error" in reply.json()


def test_a_clients_job_headers_are_not_obeyed(server, models):
    assert load(server, "b", models["b"]).status in (200, 409)
    forged = {"X-Kennel-Mme-Op": "load", "X-Kennel-Mme-Model": "c2", "X-Kennel-Mme-Url": str(models["c"]),
              "X-Kennel-Mme-Token": "1", "X-Kennel-Mme-Secret": "guess"}
    reply = invoke(server, "b", headers=forged)
    assert reply.status == 200 and len(reply.json()[0]) == 7  # b answered, nothing was loaded
    assert http(f"{server.url}/models/c2").status == 404
    assert not re.search(r"model c2\b", server.log())  # no worker loaded, or even tried, a model "c2"


def test_a_single_model_endpoint_has_no_models_routes(tmp_path, plugins, models):  # noqa: F811
    process = ServeProcess(models["c"].parent, plugins)
    try:
        process.start().wait_ready()
        assert http(f"{process.url}/models").status == 404
        assert load(process, "a", models["a"]).status in (404, 405)
    finally:
        process.stop()


def test_the_local_runtime_loads_a_target_model_on_first_use_as_sagemaker_does(server, models, monkeypatch):
    import boto3
    import botocore.exceptions

    from kennel_ops.local_runtime import LocalRuntime

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    root = models["a"].parent.parent  # NAME/model below it, as SageMaker extracts model.tar.gz
    with LocalRuntime(server.url, ["mme"], multi_model=True, models_root=str(root)) as runtime:
        client = boto3.client("sagemaker-runtime", region_name="us-east-1", endpoint_url=runtime.url)
        http(f"{server.url}/models/c", method="DELETE")  # whatever earlier tests left loaded
        answer = client.invoke_endpoint(EndpointName="mme", TargetModel="c.tar.gz", Body=PHOTO,
                                        ContentType="image/jpeg", Accept=JSON_ANSWER)
        assert len(json.loads(answer["Body"].read())[0]) == 4
        assert "c" in [m["modelName"] for m in http(f"{server.url}/models").json()["models"]]
        for target in (None, "c", "../c.tar.gz"):
            with pytest.raises(botocore.exceptions.ClientError, match="ValidationError.*TargetModel"):
                client.invoke_endpoint(EndpointName="mme", Body=PHOTO, ContentType="image/jpeg",
                                       **({"TargetModel": target} if target else {}))
        with pytest.raises(botocore.exceptions.ClientError, match="ModelError"):
            client.invoke_endpoint(EndpointName="mme", TargetModel="missing.tar.gz", Body=PHOTO,
                                   ContentType="image/jpeg")
