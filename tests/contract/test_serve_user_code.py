"""A user's code/inference.py overrides the handlers, as in SageMaker's framework images;
code/requirements.txt is installed first. Errors stay JSON without tracebacks."""
import base64
import hashlib
import io
import json
import zipfile

import numpy as np
import pytest

from kennel_serve.engine import KennelModel
from serve_support import ServeProcess, base_with_code, jpeg_bytes, plugins, resnet18_base  # noqa: F401

HANDLERS = """
import io
import json

import numpy as np
from sagemaker_inference.errors import GenericInferenceToolkitError

import kennel_extra  # installed from code/requirements.txt


def input_fn(input_data, content_type):
    if content_type == "application/x-npy":  # parameters are stripped before user code sees it
        return np.load(io.BytesIO(input_data))
    if content_type == "application/x-teapot":
        raise GenericInferenceToolkitError(422, "teapots cannot be classified")
    if content_type == "application/x-boom":
        raise RuntimeError("internal detail /opt/secret/path")
    raise GenericInferenceToolkitError(415, "send application/x-npy")


def output_fn(prediction, accept):
    body = {"argmax": prediction.logits.argmax(axis=1).tolist(), "marker": kennel_extra.MARKER}
    return json.dumps(body), "application/vnd.custom+json"
"""


def wheel(directory) -> str:
    """A minimal pure-Python wheel, kennel_extra 1.0, built by hand (no index, no download)."""
    files = {"kennel_extra.py": b"MARKER = 'installed from requirements.txt'\n",
             "kennel_extra-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: kennel-extra\nVersion: 1.0\n",
             "kennel_extra-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                 b"Tag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for name, data in files.items()]
    files["kennel_extra-1.0.dist-info/RECORD"] = ("\n".join(record + ["kennel_extra-1.0.dist-info/RECORD,,"]) + "\n").encode()
    path = directory / "kennel_extra-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return str(path)


@pytest.fixture(scope="module")
def server(resnet18_base, plugins, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("user-code")
    base = base_with_code(tmp_path, resnet18_base, HANDLERS, **{"requirements.txt": wheel(tmp_path) + "\n"})
    (base / "model" / "code" / "inference.py").rename(base / "model" / "code" / "handlers.py")
    process = ServeProcess(base, plugins, env={"SAGEMAKER_PROGRAM": "handlers.py", "PIP_NO_INDEX": "1"}).start()
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def test_user_input_and_output_fn_with_the_default_model_and_predict_fn(server, resnet18_base):
    model = KennelModel.load(resnet18_base / "model")
    batch = model.preprocess([decoded(1), decoded(2)])
    buffer = io.BytesIO()
    np.save(buffer, batch)
    reply = server.invoke(buffer.getvalue(), "application/x-npy; version=1")
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/vnd.custom+json"
    assert reply.json() == {"argmax": model.forward(batch).argmax(axis=1).tolist(),
                            "marker": "installed from requirements.txt"}


def decoded(seed):
    from kennel_artifact import decode_image
    return decode_image(jpeg_bytes((400, 300), seed=seed))


def test_user_errors_keep_their_status_and_internal_errors_say_nothing(server):
    reply = server.invoke(b"x", "application/x-teapot")
    assert reply.status == 422 and reply.json() == {"error": "teapots cannot be classified"}
    reply = server.invoke(b"x", "application/x-boom")
    assert reply.status == 500
    assert reply.json() == {"error": "internal error while handling the request; the server log has the details"}
    assert "secret" not in reply.body.decode() and "Traceback" not in reply.body.decode()
    assert "internal detail /opt/secret/path" in server.log()  # the details are in the log, for the operator
    assert server.ping() == 200
    assert server.invoke(b"x", "image/jpeg").status == 415
