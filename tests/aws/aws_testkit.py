"""Helpers shared by the AWS tests: constants, moto's request recording, the registry,
stubbed operations. Fixtures live in conftest.py and use these.
"""
from __future__ import annotations

import base64
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import requests
from botocore.stub import Stubber

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
BUCKET = "kennel-data"
DATA = f"s3://{BUCKET}/dogImages/"
WEIGHTS = f"s3://{BUCKET}/weights/"
FUNCTION = "kennel-classify"


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


MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                       "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 2,
                                  "digest": "sha256:" + "0" * 64}, "layers": []})


def put_image(ecr, repository: str, tag: str) -> None:
    manifest = json.loads(MANIFEST)
    manifest["config"]["digest"] = "sha256:" + tag.encode().hex().ljust(64, "0")[:64]
    ecr.put_image(repositoryName=repository, imageManifest=json.dumps(manifest), imageTag=tag)


# moto has no provisioned-concurrency API (its server answers 404): these go to a Stubber.
PC_OPERATIONS = {"get_provisioned_concurrency_config", "put_provisioned_concurrency_config",
                 "delete_provisioned_concurrency_config"}


class RoutedClient:
    """moto's Lambda client, except PC_OPERATIONS, which a Stubber-backed client answers: it checks
    each request against the Lambda service model and answers what Lambda documents."""

    def __init__(self, real, stubbed) -> None:
        self._real, self._stubbed = real, stubbed

    def __getattr__(self, name: str):
        return getattr(self._stubbed if name in PC_OPERATIONS else self._real, name)


KEY = {"FunctionName": FUNCTION, "Qualifier": "live"}


def pc_absent(stubber: Stubber) -> None:
    stubber.add_client_error("get_provisioned_concurrency_config", "ProvisionedConcurrencyConfigNotFoundException",
                             "No Provisioned Concurrency Config found for this function", 404, expected_params=KEY)


def pc_state(stubber: Stubber, status: str, requested: int, available: int = 0) -> None:
    stubber.add_response("get_provisioned_concurrency_config", {
        "RequestedProvisionedConcurrentExecutions": requested, "AvailableProvisionedConcurrentExecutions": available,
        "AllocatedProvisionedConcurrentExecutions": available, "Status": status}, KEY)


def pc_put(stubber: Stubber, requested: int) -> None:
    stubber.add_response("put_provisioned_concurrency_config", {
        "RequestedProvisionedConcurrentExecutions": requested, "Status": "IN_PROGRESS"},
        {**KEY, "ProvisionedConcurrentExecutions": requested})
