"""INT8 over real HTTP: a model with model.int8.onnx served by the real launcher, MMS and workers.

KENNEL_PRECISION=int8 answers every request form (raw image, JSON one and several,
jsonlines as batch transform sends them) within the documented tolerance of the
FP32 graph's answers; KENNEL_PRECISION=auto logs its one choice and names it on
every answer.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import kennel_artifact
from kennel_artifact import decode_image
from kennel_serve.engine import KennelModel
from kennel_train import data, quantize
from serve_support import ServeProcess, b64, jpeg_bytes, plugins, resnet18_base  # noqa: F401

PHOTO = jpeg_bytes((500, 375), seed=1)
PNG = jpeg_bytes((320, 240), seed=2, fmt="PNG")
GREY = jpeg_bytes((300, 300), seed=3, mode="L")
# As tests/unit/test_int8.py and docs/serving.md state it.
PROBABILITY_TOLERANCE = 0.05
SCORE_TOLERANCE = 0.2


@pytest.fixture(scope="module")
def int8_base(resnet18_base, generated_dataset, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("int8-base")
    model = Path(shutil.copytree(Path(resnet18_base) / "model", base / "model"))
    manifest = kennel_artifact.read_manifest(model)
    # Calibration stands for the traffic: photos like the ones the requests below send
    # (other seeds), beside the generated dataset. Labels only matter to the gate's accuracy.
    photos = base / "photos"
    photos.mkdir()
    for seed in range(10, 22):
        (photos / f"{seed}.jpg").write_bytes(jpeg_bytes((500, 375), seed=seed))
    train = data.index_split("train", generated_dataset / "train")
    valid = data.index_split("valid", generated_dataset / "valid", train.classes)
    calibration = train.samples + [(str(path), 0) for path in sorted(photos.glob("*.jpg"))]
    record = quantize.build_int8(model, manifest, calibration, valid.samples)
    assert record["shipped"], record
    return base


@pytest.fixture(scope="module")
def fp32_model(int8_base):
    return KennelModel.load(int8_base / "model", precision_setting="fp32")


def serve(base, plugins, setting):  # noqa: F811
    return ServeProcess(base, plugins, env={"KENNEL_PRECISION": setting, "SAGEMAKER_MODEL_SERVER_WORKERS": "2"})


def assert_close_to_fp32(answer, fp32_model, *bodies):
    expected = fp32_model.predict([decode_image(body) for body in bodies])
    got = np.asarray(answer, dtype=np.float64)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=SCORE_TOLERANCE * max(1.0, float(np.abs(expected).max())))
    np.testing.assert_allclose(kennel_artifact.softmax(got), kennel_artifact.softmax(expected.astype(np.float64)),
                               rtol=0, atol=PROBABILITY_TOLERANCE)


def test_int8_answers_every_request_form_within_tolerance_of_fp32(int8_base, plugins, fp32_model):  # noqa: F811
    server = serve(int8_base, plugins, "int8").start()
    try:
        server.wait_ready()
        for content_type, body in (("image/jpeg", PHOTO), ("image/png", PNG), ("application/x-image", GREY),
                                   ("application/octet-stream", PHOTO)):
            reply = server.invoke(body, content_type)
            assert reply.status == 200, reply.body
            assert reply.headers["x-kennel-precision"] == "int8; setting=int8"
            assert_close_to_fp32(reply.json(), fp32_model, body)
        single = server.invoke(json.dumps({"image": b64(PHOTO)}).encode(), "application/json")
        assert_close_to_fp32(single.json(), fp32_model, PHOTO)
        many = server.invoke(json.dumps({"images": [b64(PHOTO), b64(PNG), b64(GREY)]}).encode(), "application/json")
        assert_close_to_fp32(many.json(), fp32_model, PHOTO, PNG, GREY)
        # Batch transform: jsonlines in, jsonlines out.
        lines = "".join(json.dumps({"image": b64(body)}) + "\n" for body in (GREY, PHOTO, PNG))
        reply = server.invoke(lines.encode(), "application/jsonlines", accept="application/jsonlines")
        assert reply.status == 200 and reply.headers["content-type"] == "application/jsonlines"
        answers = [json.loads(line) for line in reply.body.decode().splitlines()]
        assert_close_to_fp32(np.concatenate(answers), fp32_model, GREY, PHOTO, PNG)
        # The top-k form: the same best breed as FP32 on a clear photo.
        topk = server.invoke(PHOTO, "image/jpeg", accept="application/vnd.kennel.topk+json")
        assert topk.status == 200 and len(topk.json()[0]) == 5
        # Bad input is still a clear 4xx, and it too names the graph.
        refused = server.invoke(b"not an image", "image/jpeg")
        assert refused.status == 400 and refused.headers["x-kennel-precision"] == "int8; setting=int8"
    finally:
        server.stop()
    assert "serving the INT8 graph (KENNEL_PRECISION=int8: pinned)" in server.log()


def test_auto_measures_once_logs_its_choice_and_names_it_on_answers(int8_base, plugins):  # noqa: F811
    server = serve(int8_base, plugins, "auto").start()
    try:
        server.wait_ready()
        reply = server.invoke(PHOTO, "image/jpeg")
        assert reply.status == 200, reply.body
        header = reply.headers["x-kennel-precision"]
        precision, setting, speedup = header.split("; ")
        assert precision in ("int8", "fp32") and setting == "setting=auto"
        ratio = float(speedup.removeprefix("speedup="))
        assert precision == ("int8" if ratio >= 1.2 else "fp32")
        second = server.invoke(PNG, "image/png")
        assert second.headers["x-kennel-precision"] == header  # both workers serve the same graph
    finally:
        server.stop()
    chosen = [line for line in server.log().splitlines() if "(KENNEL_PRECISION=auto:" in line]
    assert len(chosen) == 1, chosen  # two workers, one measurement, one line
    assert f"serving the {precision.upper()} graph" in chosen[0] and f"{ratio:.2f} x as fast" in chosen[0]
