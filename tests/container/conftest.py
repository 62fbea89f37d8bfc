"""Container tests: a real Docker engine, the real images, talked to over 127.0.0.1 only.

No engine is a failure, never a skip: every test here errors with the reason
(`make setup` starts one). The images are built once per run through the
Makefile's own targets, so the suite, `make images` and compose share one cache.
"""
from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from docker_cli import COMPOSE_FILE, REPO, run

TRAIN_IMAGE = os.environ.get("KENNEL_TRAIN_IMAGE", "kennel-train:latest")
SERVE_IMAGE = os.environ.get("KENNEL_SERVE_IMAGE", "kennel-serve:latest")
# The first build downloads torch (several GB); later ones are cached.
BUILD_TIMEOUT_S = 3600


@pytest.fixture(scope="session", autouse=True)
def docker_engine() -> str:
    """The engine's version; every container test errors (not skips) without one."""
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.fail(f"no Docker engine ({error}); run `make setup`", pytrace=False)
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.fail(f"no Docker engine: `docker info` failed: {reason}; run `make setup`", pytrace=False)
    compose = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True, timeout=60)
    if compose.returncode != 0:
        pytest.fail("the docker compose v2 plugin is missing; run `make setup`", pytrace=False)
    return info.stdout.strip()


def build_with_make(target: str, image_variable: str, image: str, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("build") / f"{target}.log"
    with open(log, "w") as out:
        result = subprocess.run(["make", "--no-print-directory", target, f"{image_variable}={image}"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(f"`make {target}` failed:\n{log.read_text()[-6000:]}", pytrace=False)
    return image


@pytest.fixture(scope="session")
def train_image(tmp_path_factory) -> str:
    """kennel-train, built by `make image-train` (once per run)."""
    return build_with_make("image-train", "TRAIN_IMAGE", TRAIN_IMAGE, tmp_path_factory)


@pytest.fixture(scope="session")
def serve_image(tmp_path_factory) -> str:
    """kennel-serve, built by `make image-serve` (once per run)."""
    return build_with_make("image-serve", "SERVE_IMAGE", SERVE_IMAGE, tmp_path_factory)


class ComposeProject:
    """The repository's compose.yaml under its own project name, with folders in a tmp dir."""

    def __init__(self, directory: Path, env: dict[str, str]):
        self.directory = directory
        self.name = f"kennel-test-{uuid.uuid4().hex[:10]}"
        self.env = {**os.environ, **env}

    def command(self, *args: str) -> list[str]:
        return ["docker", "compose", "--project-name", self.name, "--project-directory", str(self.directory),
                "--file", str(COMPOSE_FILE), *args]

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return run(self.command(*args), timeout=timeout, check=check, env=self.env)

    def leftovers(self, kind: str) -> list[str]:
        """Containers ("ps"), volumes or networks of this project that still exist."""
        listing = ["docker", kind, *(["--all"] if kind == "ps" else ["ls"]), "--quiet",
                   "--filter", f"label=com.docker.compose.project={self.name}"]
        return subprocess.run(listing, capture_output=True, text=True, timeout=60).stdout.split()

    def down(self) -> None:
        # Every profile: `down` leaves the containers of services in a profile it was not given
        # (algo-1 and algo-2 of the distributed profile), and they are no orphans either.
        subprocess.run(self.command("--profile", "*", "down", "--volumes", "--remove-orphans", "--timeout", "5"),
                       capture_output=True, timeout=300, env=self.env)


@pytest.fixture
def compose_project(tmp_path, train_image):
    """A factory: compose_project(**env) -> ComposeProject; torn down (volumes too) after the test."""
    projects: list[ComposeProject] = []

    def make(**env: str) -> ComposeProject:
        project = ComposeProject(tmp_path, {"KENNEL_TRAIN_IMAGE": train_image, "KENNEL_SERVE_IMAGE": SERVE_IMAGE, **env})
        projects.append(project)
        return project

    yield make
    for project in projects:
        project.down()
    left = [name for project in projects for kind in ("ps", "volume", "network")
            for name in project.leftovers(kind)]
    assert not left, f"compose down left these behind: {left}"
