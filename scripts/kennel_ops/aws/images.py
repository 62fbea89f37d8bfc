"""Tagging and pushing local images with the Docker SDK (any registry, ECR included).

The push is streamed: the engine reports errors inside the stream (not as an
HTTP error), so every line is checked, and progress is printed per layer.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kennel_ops.aws.context import CliError, Console
from kennel_ops.checkout import REPO

VERSION_LABEL = "org.opencontainers.image.version"
REVISION_LABEL = "org.opencontainers.image.revision"
PROGRESS_EVERY_S = 15.0


@dataclass(frozen=True)
class PushResult:
    reference: str  # host/repository:tag
    digest: str     # sha256:... of the manifest the registry stored


def docker_client() -> Any:
    import docker  # imported here: only push needs the Docker engine
    from docker.errors import DockerException
    try:
        client = docker.from_env()
        client.ping()
        return client
    except DockerException as error:
        raise CliError(f"cannot talk to the Docker engine ({error}); is dockerd running? (make setup)") from None


def local_image(client: Any, reference: str) -> Any:
    from docker.errors import ImageNotFound
    try:
        return client.images.get(reference)
    except ImageNotFound:
        raise CliError(f"no local image {reference}: build it first (make images)") from None


def git_commit(root: Path = REPO) -> str | None:
    """The checkout's commit (12 hex), with -dirty when tracked files are modified."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def image_tag(image: Any, version: str | None, commit: str | None) -> str:
    """<version>-<commit>. The version: the flag, else the image's OCI version label,
    else "dev". The commit: the image's OCI revision label (the commit it was built
    from, 12 hex digits kept, a "-dirty" suffix too), else the flag, else the checkout's.

    Tags are immutable in ECR, so a tag names exactly one build.
    """
    labels = image.labels or {}
    version = version or labels.get(VERSION_LABEL) or "dev"
    revision = labels.get(REVISION_LABEL)
    if revision:
        sha, dash, suffix = revision.partition("-")
        commit = sha[:12] + dash + suffix
    else:
        commit = commit or git_commit() or "nogit"
    return f"{version}-{commit}"


def registry_digest(image: Any, repository: str) -> str | None:
    """The digest this image already has in `repository` (host/name), if it was pushed there."""
    for entry in image.attrs.get("RepoDigests") or []:
        name, _, digest = entry.partition("@")
        if name == repository:
            return digest
    return None


def push(client: Any, image: Any, repository: str, tag: str, auth: dict | None, console: Console) -> PushResult:
    """Tag `image` as repository:tag and push it; returns the stored manifest digest."""
    reference = f"{repository}:{tag}"
    if not image.tag(repository, tag):
        raise CliError(f"docker could not tag the image as {reference}")
    console.note(f"pushing {reference}")
    digest, layers, last_progress = None, {}, 0.0
    stream = client.api.push(repository, tag=tag, stream=True, decode=True, auth_config=auth)
    for event in stream:
        if "error" in event or "errorDetail" in event:
            message = event.get("error") or event.get("errorDetail", {}).get("message", "unknown error")
            raise CliError(f"push of {reference} failed: {message}")
        layer, status = event.get("id"), event.get("status", "")
        if "aux" in event and event["aux"].get("Digest"):
            digest = event["aux"]["Digest"]
        elif layer and (status in ("Pushed", "Layer already exists") or status.startswith("Mounted from")):
            console.note(f"  {layer}: {status}")
        elif layer and status == "Pushing":
            layers[layer] = event.get("progressDetail", {})
            now = time.monotonic()
            if now - last_progress >= PROGRESS_EVERY_S:
                done = sum(p.get("current", 0) for p in layers.values())
                total = sum(p.get("total", 0) for p in layers.values())
                console.note(f"  {done / 1e6:.0f} of {total / 1e6:.0f} MB in {len(layers)} layers being pushed")
                last_progress = now
    if not digest:
        raise CliError(f"push of {reference} ended without a digest from the registry")
    return PushResult(reference, digest)
