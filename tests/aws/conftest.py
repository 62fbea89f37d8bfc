"""Fixtures for the AWS operator commands: moto in server mode and a real OCI registry.

moto runs as its own process (`python -m moto.server`) on 127.0.0.1 with request
recording on, so a test can see every request the commands sent: the exact
CreateTrainingJob body (moto's describe rewrites MetricDefinitions), and, for
--dry-run, that nothing but reads reached the server. boto3 finds it through
AWS_ENDPOINT_URL with dummy credentials; no request leaves the machine.

The registry is Debian's docker-registry (distribution) on 127.0.0.1 with
filesystem storage in a temporary folder. dockerd treats 127.0.0.0/8 as an
insecure registry by default, so plain HTTP works without daemon changes
(test_aws_push checks `docker info` says so).
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import boto3
import pytest
import requests

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
REGISTRY_BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
FIXTURES = Path(__file__).parent / "fixtures"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, ok: tuple[int, ...], timeout_s: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before answering {url}")
        try:
            if requests.get(url, timeout=1).status_code in ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ----------------------------------------------------------------------------- moto


@dataclass(frozen=True)
class Request:
    """One request moto received, with the service operation it named."""

    method: str
    path: str
    operation: str  # e.g. "SageMaker.CreateTrainingJob", "iam:CreateRole", "GET /2015-03-31/functions/x"
    body: str

    @property
    def json(self) -> dict:
        return json.loads(self.body or "{}")

    @property
    def mutating(self) -> bool:
        """True unless the operation only reads (Describe/List/Get, or an HTTP GET)."""
        if self.operation.startswith(("GET ", "HEAD ")):
            return False
        name = self.operation.split(".")[-1].split(":")[-1]
        return not name.startswith(("Describe", "List", "Get", "BatchGet", "BatchCheck"))


class MotoServer:
    def __init__(self, url: str, recording: Path) -> None:
        self.url = url
        self.recording = recording

    def reset(self) -> None:
        requests.post(f"{self.url}/moto-api/reset", timeout=10).raise_for_status()
        self.reset_recording()

    def reset_recording(self) -> None:
        requests.post(f"{self.url}/moto-api/recorder/reset-recording", timeout=10).raise_for_status()

    def requests(self) -> list[Request]:
        entries = []
        if not self.recording.exists():
            return entries
        for line in self.recording.read_text().splitlines():
            entry = json.loads(line)
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode("utf-8", "replace")
            entries.append(self._request(entry, body))
        return entries

    @staticmethod
    def _request(entry: dict, body: str) -> Request:
        headers = {key.lower(): value for key, value in entry["headers"].items()}
        path = urlparse(entry["url"]).path
        target = headers.get("x-amz-target")
        if target:  # JSON protocol: SageMaker, ECR, Application Auto Scaling
            operation = target
        elif "Action=" in body:  # query protocol: IAM, STS
            service = headers.get("authorization", "").split("/")[3] if "/" in headers.get("authorization", "") else "?"
            operation = f"{service}:{parse_qs(body)['Action'][0]}"
        else:  # REST protocols: Lambda, S3
            operation = f"{entry['method']} {path}"
        return Request(entry["method"], path, operation, body)

    def operations(self) -> list[str]:
        return [request.operation for request in self.requests()]

    def mutating(self) -> list[str]:
        return [request.operation for request in self.requests() if request.mutating]

    def sent(self, operation: str) -> list[dict]:
        """Bodies (JSON) of the requests for one JSON-protocol operation, e.g. SageMaker.CreateModel."""
        return [request.json for request in self.requests() if request.operation == operation]


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("moto")
    recording = folder / "recording.jsonl"
    port = free_port()
    env = {**os.environ, "MOTO_ENABLE_RECORDING": "true", "MOTO_RECORDER_FILEPATH": str(recording)}
    log = open(folder / "moto.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/moto-api/", ok=(200,), process=process)
        yield MotoServer(url, recording)
    finally:
        stop(process)
        log.close()


@pytest.fixture
def moto(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    """A clean moto (all state and the recording reset) that boto3 in this process talks to."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    empty = tmp_path / "aws-empty-config"
    empty.write_text("")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    moto_server.reset()
    return moto_server


@pytest.fixture
def aws(moto: MotoServer):
    """boto3 clients on the moto server (for arranging and asserting state)."""
    session = boto3.Session(region_name=REGION)
    return lambda service: session.client(service)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture):
    """Run `aws.py ARGS` in this process: returns (exit status, stdout, stderr)."""
    from kennel_aws.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            status = main([str(arg) for arg in argv])
        except SystemExit as exit_:  # argparse
            status = exit_.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def planned_requests(stdout: str) -> list[dict]:
    """The JSON request objects a --dry-run printed (other stdout lines are skipped)."""
    decoder, requests, index = json.JSONDecoder(), [], 0
    while index < len(stdout):
        if stdout[index] == "{":
            value, index = decoder.raw_decode(stdout, index)
            requests.append(value)
        else:
            index = stdout.find("\n", index) + 1 or len(stdout)
    return requests


@pytest.fixture
def planned():
    return planned_requests


@pytest.fixture
def metric_definitions() -> Path:
    """The training image's MetricDefinitions when the file exists, else the fixture copy."""
    from kennel_aws.training import METRIC_DEFINITIONS
    return METRIC_DEFINITIONS if METRIC_DEFINITIONS.is_file() else FIXTURES / "metric_definitions.json"


# ----------------------------------------------------------------------------- registry + docker


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    auth: tuple[str, str] | None = None

    def get(self, path: str, **headers: str) -> requests.Response:
        return requests.get(f"http://{self.host}{path}", headers=headers, auth=self.auth, timeout=10)

    def tags(self, repository: str) -> list[str]:
        response = self.get(f"/v2/{repository}/tags/list")
        if response.status_code == 404:
            return []
        response.raise_for_status()
        return sorted(response.json().get("tags") or [])

    def catalog(self) -> list[str]:
        response = self.get("/v2/_catalog")
        response.raise_for_status()
        return sorted(response.json().get("repositories") or [])

    def manifest_digest(self, repository: str, tag: str) -> str:
        accept = ", ".join(["application/vnd.docker.distribution.manifest.v2+json",
                            "application/vnd.oci.image.manifest.v1+json"])
        response = self.get(f"/v2/{repository}/manifests/{tag}", Accept=accept)
        response.raise_for_status()
        return response.headers["Docker-Content-Digest"]


def start_registry(folder: Path, htpasswd: str | None = None):
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(folder / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    if htpasswd:
        (folder / "htpasswd").write_text(htpasswd)
        config["auth"] = {"htpasswd": {"realm": "kennel-test", "path": str(folder / "htpasswd")}}
    # distribution reads YAML; JSON is YAML.
    (folder / "config.yml").write_text(json.dumps(config))
    log = open(folder / "registry.log", "wb")
    process = subprocess.Popen([REGISTRY_BINARY, "serve", str(folder / "config.yml")],
                               stdout=log, stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/v2/", ok=(200, 401), process=process)
    return process, log, f"127.0.0.1:{port}"


@pytest.fixture
def registry(tmp_path: Path):
    process, log, host = start_registry(tmp_path)
    try:
        yield Registry(host)
    finally:
        stop(process)
        log.close()


@pytest.fixture
def auth_registry(tmp_path: Path):
    import bcrypt
    user, password = "kennel", f"pw-{uuid.uuid4().hex[:12]}"
    line = f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
    process, log, host = start_registry(tmp_path, htpasswd=line)
    try:
        yield Registry(host, (user, password))
    finally:
        stop(process)
        log.close()


@pytest.fixture(scope="session")
def docker_client():
    import docker
    from docker.errors import DockerException
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as error:
        pytest.fail(f"the push tests need the Docker engine (make setup): {error}")
    return client


@pytest.fixture(scope="session")
def tiny_images(docker_client):
    """Two small local images (FROM scratch, one file, OCI version/revision labels), removed afterwards."""
    suffix = uuid.uuid4().hex[:8]
    built = {}
    for role in ("train", "serve"):
        reference = f"kennel-aws-test-{role}:{suffix}"
        dockerfile = (f"FROM scratch\nLABEL kennel.test=aws-push org.opencontainers.image.version=9.8.7 "
                      f"org.opencontainers.image.revision=0123456789abcdef0123456789abcdef01234567\n"
                      f"COPY {role}.txt /{role}.txt\n")
        context = io.BytesIO()
        with tarfile.open(fileobj=context, mode="w") as archive:
            for name, text in (("Dockerfile", dockerfile), (f"{role}.txt", f"kennel {role} {suffix}\n")):
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        context.seek(0)
        docker_client.images.build(fileobj=context, custom_context=True, tag=reference, rm=True)
        built[role] = reference
    yield built
    for image in docker_client.images.list(filters={"label": "kennel.test=aws-push"}):
        docker_client.images.remove(image.id, force=True)
