"""Helpers for the serving contract tests: the MMS plugin jar, model dirs, a real `serve` process.

`serve` runs exactly as in the image (python -m kennel_serve serve: the launcher, the
JVM, the Python workers), on a free 127.0.0.1 port, with its own state dir, so
several can run side by side and beside anything else on the host.
"""
from __future__ import annotations

import base64
import http.client as http_client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from kennel_ops.ports import free_mms_port

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "containers" / "serve" / "mms-plugin"
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("containers/artifact", "containers/serve"))


def model_server_jar() -> Path:
    import mms
    return Path(mms.__file__).parent / "frontend" / "model-server.jar"


def build_plugin(out_dir: Path) -> Path:
    """The MMS plugin jar, compiled with the host JDK exactly as the image's build stage does."""
    if shutil.which("javac") is None or shutil.which("jar") is None:
        raise RuntimeError("javac/jar not found: the serving tests compile the MMS plugin with a JDK "
                           "(apt-get install openjdk-17-jdk-headless)")
    jar = out_dir / "kennel-mms-plugin.jar"
    subprocess.run(["sh", str(PLUGIN_DIR / "build.sh"), str(model_server_jar()), str(jar)], check=True,
                   capture_output=True, timeout=300)
    return out_dir


def jpeg_bytes(size=(500, 375), seed: int = 0, mode: str = "RGB", fmt: str = "JPEG", **save) -> bytes:
    """A photo-sized test image with some structure (gradients + noise)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), ((x + y) % 256)], axis=-1)
    rgb = np.clip(rgb + rng.integers(-30, 30, rgb.shape), 0, 255).astype("uint8")
    image = Image.fromarray(rgb, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def http(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None,
         timeout: float = 60) -> Reply:
    """One request with exactly these headers (urllib would add a form Content-Type to any POST)."""
    parts = urllib.parse.urlsplit(url)
    connection = http_client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method or ("POST" if body is not None else "GET"),
                           parts.path + (f"?{parts.query}" if parts.query else ""), body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


class ServeProcess:
    """`python -m kennel_serve serve` on the host, talked to over 127.0.0.1."""

    def __init__(self, base_dir: Path, plugins: Path, env: dict[str, str] | None = None):
        self.base_dir = Path(base_dir)
        self.port = free_mms_port()
        # Short: MMS puts Unix sockets in here (108-byte path limit).
        self.state_dir = Path(tempfile.mkdtemp(prefix="ks-"))
        self.log_path = self.state_dir.with_name(self.state_dir.name + ".log")
        self.env = {**os.environ, "PYTHONPATH": PYTHONPATH, "SAGEMAKER_BASE_DIR": str(self.base_dir),
                    "SAGEMAKER_BIND_TO_PORT": str(self.port), "KENNEL_BIND_ADDRESS": "127.0.0.1",
                    "KENNEL_SERVE_STATE_DIR": str(self.state_dir), "KENNEL_MMS_PLUGINS": str(plugins),
                    "SAGEMAKER_MODEL_SERVER_WORKERS": "1", "KENNEL_ORT_THREADS": "1",
                    # No metrics port unless a test asks (servers run side by side on the host).
                    "KENNEL_METRICS_PORT": "0", **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServeProcess":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "kennel_serve", "serve"], env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
        return self

    def wait_ready(self, timeout: float = 180) -> "ServeProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited {self.process.returncode}:\n{self.log()[-3000:]}")
            if self.ping() == 200:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"/ping not 200 within {timeout} s:\n{self.log()[-3000:]}")

    def ping(self) -> int | None:
        try:
            return http(f"{self.url}/ping", timeout=3).status
        except OSError:
            return None

    def invoke(self, body: bytes, content_type: str | None = "image/jpeg", accept: str | None = None,
               headers: dict | None = None, timeout: float = 60) -> Reply:
        all_headers = dict(headers or {})
        if content_type is not None:
            all_headers["Content-Type"] = content_type
        if accept is not None:
            all_headers["Accept"] = accept
        return http(f"{self.url}/invocations", body, all_headers, method="POST", timeout=timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self, timeout: float = 40) -> int:
        """SIGTERM, as SageMaker sends it; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.state_dir, ignore_errors=True)


# -- pytest fixtures shared by the serving contract tests (import them into the test module) --

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def plugins(tmp_path_factory) -> Path:
    """A directory holding the freshly compiled MMS plugin jar."""
    return build_plugin(tmp_path_factory.mktemp("mms-plugins"))


@pytest.fixture(scope="session")
def resnet18_base(tmp_path_factory) -> Path:
    """SAGEMAKER_BASE_DIR whose model/ is a random-weight ResNet-18 artifact (5 classes, ImageNet eval)."""
    from kennel_ops.bench.models import write_random_model
    base = tmp_path_factory.mktemp("base")
    write_random_model(base / "model", "resnet18", num_classes=5)
    return base


def base_with_code(tmp_path: Path, model_base: Path, inference_py: str, **extra_files: str) -> Path:
    """A copy of the model (symlinked files) plus code/inference.py: a user's own handlers."""
    base = tmp_path / "base"
    model = base / "model"
    (model / "code").mkdir(parents=True)
    for item in (model_base / "model").iterdir():
        if item.is_file():
            (model / item.name).symlink_to(item)
    (model / "code" / "inference.py").write_text(inference_py)
    for name, text in extra_files.items():
        (model / "code" / name).write_text(text)
    return base
