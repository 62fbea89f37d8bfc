"""Fixtures for the AWS operator commands: moto in server mode, a real OCI registry, and
small kennel model folders (model_folder).

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

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from kennel_ops.ports import free_port

from aws_testkit import (BUCKET, DATA, REGION, MotoServer, Registry, RoutedClient, planned_requests,
                         put_image, stop, wait_http)

REGISTRY_BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
FIXTURES = Path(__file__).parent / "fixtures"


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
    from kennel_ops.aws.context import new_session

    session, clients = new_session(region=REGION), {}

    def client(service: str):
        if service not in clients:
            clients[service] = session.client(service)
        return clients[service]

    return client


@pytest.fixture
def cli(capsys: pytest.CaptureFixture):
    """Run `kennel-aws ARGS` in this process: returns (exit status, stdout, stderr)."""
    from kennel_ops.aws.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            status = main([str(arg) for arg in argv])
        except SystemExit as exit_:  # argparse
            status = exit_.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


@pytest.fixture
def planned():
    return planned_requests


@pytest.fixture
def metric_definitions() -> Path:
    """The training image's MetricDefinitions when the file exists, else the fixture copy."""
    from kennel_ops.aws.training import METRIC_DEFINITIONS
    return METRIC_DEFINITIONS if METRIC_DEFINITIONS.is_file() else FIXTURES / "metric_definitions.json"


# ----------------------------------------------------------------------------- model folders


@pytest.fixture
def model_folder(tmp_path: Path):
    """make(name, onnx=b"...") -> a kennel model folder tmp_path/models/name: kennel.json (the real
    manifest, its checksum over these bytes), model.onnx (any bytes: nothing here runs it), the
    model.pth serving never reads, and a code/inference.py."""
    import kennel_artifact

    def make(name: str = "rex", onnx: bytes = b"onnx graph of " + b"x" * 4096) -> Path:
        folder = tmp_path / "models" / name
        (folder / "code").mkdir(parents=True)
        (folder / kennel_artifact.ONNX_FILE).write_bytes(onnx)
        (folder / kennel_artifact.WEIGHTS_FILE).write_bytes(b"torch state_dict")
        (folder / "code" / "inference.py").write_text("def model_fn(model_dir):\n    return None\n")
        kennel_artifact.write_manifest(folder, kennel_artifact.Manifest(
            architecture="resnet18", class_names=["001.Affenpinscher", "002.Afghan_hound"],
            preprocessing=kennel_artifact.IMAGENET_EVAL))
        return folder

    return make


# ----------------------------------------------------------------------------- registry + docker


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


# ----------------------------------------------------------------------------- staged deployments


@pytest.fixture
def staged(moto, aws, cli):
    """Data in the original layout, both repositories with an image, the execution role."""
    stage(moto, aws, cli, older_images=False)


@pytest.fixture
def staged_with_older_images(moto, aws, cli):
    """As ``staged``, each repository also holding an older image pushed a second earlier."""
    stage(moto, aws, cli, older_images=True)


def stage(moto, aws, cli, older_images: bool) -> None:
    s3 = aws("s3")
    s3.create_bucket(Bucket=BUCKET)
    for split in ("train", "valid", "test"):
        s3.put_object(Bucket=BUCKET, Key=f"dogImages/{split}/001.Affenpinscher/a.jpg", Body=b"jpeg")
    s3.put_object(Bucket=BUCKET, Key="weights/resnet50-0676ba61.pth", Body=b"weights")
    ecr = aws("ecr")
    for repository in ("kennel-train", "kennel-serve"):
        ecr.create_repository(repositoryName=repository)
    if older_images:
        put_image(ecr, "kennel-train", "1.0.0-aaaaaaaaaaaa")
        put_image(ecr, "kennel-serve", "1.0.0-aaaaaaaaaaaa")
        time.sleep(1.1)  # moto's imagePushedAt has one-second resolution
    put_image(ecr, "kennel-train", "1.0.1-bbbbbbbbbbbb")
    put_image(ecr, "kennel-serve", "1.0.1-bbbbbbbbbbbb")
    status, _, err = cli("role", "--bucket", BUCKET)
    assert status == 0, err
    moto.reset_recording()


@pytest.fixture
def trained(cli, moto, staged, metric_definitions):
    status, _, err = cli("train", "--data", DATA, "--job-name", "kennel-t1", "--metric-definitions",
                         str(metric_definitions), "--poll-seconds", "0.01", "-p", "pretrained=false")
    assert status == 0, err
    moto.reset_recording()


@pytest.fixture
def deployed(cli, moto, trained):
    status, _, err = cli("deploy", "--poll-seconds", "0.01")
    assert status == 0, err
    moto.reset_recording()


@pytest.fixture
def provisioned(moto, monkeypatch):
    """The Stubber for the provisioned-concurrency operations (asserted empty at the end)."""
    from kennel_ops.aws.context import Aws
    stub_client = boto3.Session(region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x").client("lambda")
    stubber = Stubber(stub_client)
    stubber.activate()
    real_client = Aws.client

    def client(self, service):
        real = real_client(self, service)
        return RoutedClient(real, stub_client) if service == "lambda" else real

    monkeypatch.setattr(Aws, "client", client)
    yield stubber
    stubber.assert_no_pending_responses()
