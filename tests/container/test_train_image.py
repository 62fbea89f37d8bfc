"""The training image on a real engine: its contents, the entrypoint, and the training
contract end to end (docker compose on the bundled sample, `docker run IMAGE train`
on a hand-made /opt/ml, a broken dataset, SIGTERM and resume)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from docker_cli import run

pytestmark = pytest.mark.container


def docker_run(image: str, *args: str, volumes: dict[Path, str] | None = None, env: dict[str, str] | None = None,
               timeout: float = 300, check: bool = True):
    command = ["docker", "run", "--rm"]
    for host, container in (volumes or {}).items():
        command += ["-v", f"{host}:{container}"]
    for name, value in (env or {}).items():
        command += ["-e", f"{name}={value}"]
    return run([*command, image, *args], timeout=timeout, check=check)


# ---------------------------------------------------------------- the image itself

def test_image_is_labelled_and_configured_for_the_toolkit(train_image):
    config = json.loads(run(["docker", "image", "inspect", train_image], timeout=60).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["tini", "--", "/opt/kennel/entrypoint"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["SAGEMAKER_TRAINING_MODULE"] == "kennel_train.main:main"
    assert env["PYTHONPATH"] == "/opt/kennel"
    assert config["Labels"]["org.opencontainers.image.title"] == "kennel-train"
    assert config["Labels"]["kennel.torch.version"] == "2.14.1"


def test_image_holds_the_pinned_stack_and_no_build_only_files(train_image):
    script = (
        "import importlib.metadata as m, os, torch, torchvision, onnxruntime, sagemaker_training, kennel_artifact;"
        "print(torch.__version__.split('+')[0], torchvision.__version__.split('+')[0], m.version('sagemaker-training'));"
        "print(os.path.exists('/opt/ml'), os.path.exists('/etc/pip.conf'), os.path.exists('/tmp/build-ca'));"
        "print(sorted(os.listdir('/opt/kennel')))"
    )
    lines = docker_run(train_image, "python", "-c", script).stdout.splitlines()
    assert lines[0].split() == ["2.14.1", "0.29.1", "5.1.4"]
    # /opt/ml belongs to SageMaker (mounted at run time); the proxy CA stays in the build stage.
    assert lines[1] == "False False False"
    assert "kennel_train" in lines[2] and "kennel_artifact.py" in lines[2]
    assert docker_run(train_image, "pip", "check").returncode == 0
    assert docker_run(train_image, "sh", "-c", "command -v gcc || echo none").stdout.strip() == "none"


def test_tini_is_pid_1_and_runs_the_command(train_image):
    result = docker_run(train_image, "sh", "-c", "cat /proc/1/comm; cat /proc/$PPID/comm")
    assert result.stdout.split() == ["tini", "tini"]


# ---------------------------------------------------------------- the entrypoint

def test_help_lists_the_commands(train_image):
    for args in ((), ("help",)):
        out = docker_run(train_image, *args).stdout
        for command in ("train", "sample DIR", "convert", "bundled-sample DIR"):
            assert command in out


def test_unknown_command_is_one_line_and_exit_127(train_image):
    result = docker_run(train_image, "no-such-command", check=False)
    assert result.returncode == 127
    assert result.stderr.strip() == "entrypoint: no such command: no-such-command (try: help)"


def test_sample_writes_the_dataset_as_the_given_user(train_image, tmp_path):
    target = tmp_path / "sample"
    target.mkdir()
    target.chmod(0o777)
    docker_run(train_image, "sample", "/sample", "--classes", "3", "--train", "2", "--valid", "1", "--test", "1",
               volumes={target: "/sample"}, env={"KENNEL_UID": "4321", "KENNEL_GID": "4321"})
    images = sorted(p.relative_to(target).as_posix() for p in target.rglob("*.jpg"))
    assert len(images) == 12
    assert images[0] == "test/001.Affenpinscher/Affenpinscher_00000.jpg"
    assert {p.stat().st_uid for p in target.rglob("*")} == {4321}


def test_bundled_sample_is_written_once_and_skipped_for_user_data(train_image, tmp_path):
    target = tmp_path / "volume"
    first = docker_run(train_image, "bundled-sample", "/sample", volumes={target: "/sample"})
    assert "the bundled sample written to /sample" in first.stderr
    assert sorted(p.name for p in target.iterdir()) == ["test", "train", "valid"]
    count = len(list(target.rglob("*.jpg")))
    assert count == 5 * (16 + 4 + 4)
    marker = next(target.rglob("*.jpg"))
    marker.write_bytes(b"kept")
    again = docker_run(train_image, "bundled-sample", "/sample", volumes={target: "/sample"})
    assert "already in /sample" in again.stderr and marker.read_bytes() == b"kept"
    other = tmp_path / "other"
    skipped = docker_run(train_image, "bundled-sample", "/sample", volumes={other: "/sample"},
                         env={"KENNEL_TRAINING_DATA": "/data/dogImages"})
    assert "no sample needed: training on /data/dogImages" in skipped.stderr
    assert list(other.iterdir()) == []


def test_bundled_sample_replaces_an_interrupted_one(train_image, tmp_path):
    target = tmp_path / "volume"
    (target / "train" / "001.Affenpinscher").mkdir(parents=True)
    (target / ".partial" / "train").mkdir(parents=True)
    docker_run(train_image, "bundled-sample", "/sample", volumes={target: "/sample"})
    assert sorted(p.name for p in target.iterdir()) == ["test", "train", "valid"]
    assert len(list((target / "train").rglob("*.jpg"))) == 5 * 16
