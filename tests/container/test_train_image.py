"""The training image on a real engine: its contents, the entrypoint, and the training
contract end to end (docker compose on the bundled sample, `docker run IMAGE train`
on a hand-made /opt/ml, a broken dataset, SIGTERM and resume)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from docker_cli import run
from kennel_ops.aws.images import git_commit

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
    # The push tags with it: it must name the commit the image was built from.
    assert config["Labels"]["org.opencontainers.image.revision"] == git_commit()


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


def test_convert_runs_the_converter_module(train_image):
    assert "--model-pth" in docker_run(train_image, "convert", "--help").stdout
    result = docker_run(train_image, "convert", "--model-pth", "/missing.pth", "--output", "/tmp/out", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["convert: error: cannot read /missing.pth: No such file or directory"]


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


# ---------------------------------------------------------------- the training contract

SAMPLE_BREEDS = ["001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier",
                 "004.Akita", "005.Alaskan_malamute"]
# Small images and settings: each run takes seconds of compute on 2 cores.
TINY = {"architecture": "resnet18", "pretrained": "false", "epochs": "1", "batch_size": "4", "workers": "0"}


def tiny_dataset(root: Path, classes: int = 3, per_split: dict[str, int] | None = None) -> Path:
    from kennel_train.sample import generate

    return generate(root, classes, per_split or {"train": 4, "valid": 2, "test": 2}, size=(160, 120))


def hand_made_opt_ml(root: Path, hyperparameters: dict[str, str]) -> Path:
    """/opt/ml as SageMaker lays it out for one host: config files, the 'training' channel, nothing else."""
    config = root / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "inputdataconfig.json").write_text(json.dumps(
        {"training": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
                      "RecordWrapperType": "None"}}))
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"}))
    return root


def sagemaker_strings(settings: dict[str, str]) -> dict[str, str]:
    """Every value JSON-encoded as the SageMaker SDK writes it: "4", "false", "\\"resnet18\\""."""
    return {name: json.dumps(value) if name == "architecture" else value for name, value in settings.items()}


def assert_model_artifacts(model_dir: Path, output_dir: Path, class_names: list[str]) -> dict:
    import kennel_artifact

    manifest = kennel_artifact.load(model_dir)  # checks model.onnx against the manifest's checksum
    assert list(manifest.class_names) == class_names
    assert (model_dir / "model.pth").stat().st_size > 1_000_000
    metrics = json.loads((output_dir / "data" / "metrics.json").read_text())
    assert (output_dir / "data" / "training-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output_dir / "data" / "per-class-accuracy.json").is_file()
    assert not (output_dir / "failure").exists()
    return metrics


def test_compose_up_train_on_the_bundled_sample(compose_project, tmp_path):
    """The README's `docker compose up train` on a fresh folder: sample generated, model on the host, as the user."""
    project = compose_project(KENNEL_UID="4321", KENNEL_GID="4321", KENNEL_EPOCHS="1")
    project.run("up", "train", timeout=900)
    state = json.loads(project.run("ps", "--all", "--format", "json", "train", timeout=60).stdout.splitlines()[0])
    logs = project.run("logs", "--no-color", "train", timeout=60).stdout
    assert state["ExitCode"] == 0, logs[-3000:]
    assert "training on the bundled sample" in logs
    assert "Testing Loss: " in logs  # the original tuning regex still matches
    metrics = assert_model_artifacts(tmp_path / "model", tmp_path / "output", SAMPLE_BREEDS)
    assert json.dumps(metrics).count("resnet18") >= 1
    # The image's own quantizer ran (int8 is on by default): a decision with both figures,
    # whichever way the gate went on a one-epoch model.
    import kennel_artifact
    int8 = kennel_artifact.read_manifest(tmp_path / "model").int8
    assert {"shipped", "reason", "fp32_top1", "int8_top1", "agreement"} <= set(int8), int8
    assert (tmp_path / "model" / "model.int8.onnx").is_file() == int8["shipped"]
    owners = {p.stat().st_uid for folder in ("model", "output", "checkpoints") for p in (tmp_path / folder).rglob("*")}
    assert owners == {4321}


def test_compose_hyperparameters_file_reaches_the_program(compose_project, tmp_path):
    """KENNEL_HYPERPARAMETERS=file: becomes hyperparameters.json (a typo in it fails fast, naming the key)."""
    settings = tmp_path / "hp.json"
    settings.write_text(json.dumps({"epoch": 3, "pretrained": False}))
    project = compose_project(KENNEL_HYPERPARAMETERS=str(settings))
    result = project.run("run", "--rm", "train", timeout=600, check=False)
    assert result.returncode != 0
    assert "2 from KENNEL_HYPERPARAMETERS" in result.stderr
    reason = (tmp_path / "output" / "failure").read_text()
    assert "unknown hyperparameter 'epoch' in hyperparameters.json" in reason, reason

    settings.write_text("{not json")
    broken = project.run("run", "--rm", "train", timeout=600, check=False)
    assert broken.returncode == 2
    assert "entrypoint: KENNEL_HYPERPARAMETERS is not JSON: Expecting property name" in broken.stderr
    assert (tmp_path / "output" / "failure").read_text().startswith("KENNEL_HYPERPARAMETERS is not JSON")


def test_docker_run_train_on_a_hand_made_opt_ml(train_image, tmp_path):
    """The SageMaker BYOC contract: `docker run IMAGE train`, /opt/ml mounted whole, string hyperparameters."""
    opt_ml = hand_made_opt_ml(tmp_path / "ml", sagemaker_strings(TINY))
    tiny_dataset(opt_ml / "input" / "data" / "training")
    result = docker_run(train_image, "train", volumes={opt_ml: "/opt/ml"}, timeout=900)
    assert "Testing Loss: " in result.stdout
    assert_model_artifacts(opt_ml / "model", opt_ml / "output", SAMPLE_BREEDS[:3])
    assert (opt_ml / "output" / "success").is_file()
    # SageMaker's files were used as given, not replaced.
    assert json.loads((opt_ml / "input" / "config" / "resourceconfig.json").read_text())["current_host"] == "algo-1"


def test_broken_dataset_writes_the_failure_file_and_exits_non_zero(train_image, tmp_path):
    opt_ml = hand_made_opt_ml(tmp_path / "ml", sagemaker_strings(TINY))
    data = tiny_dataset(opt_ml / "input" / "data" / "training")
    (data / "valid" / "003.Airedale_terrier").rename(data / "valid" / "004.Akita")
    result = docker_run(train_image, "train", volumes={opt_ml: "/opt/ml"}, timeout=600, check=False)
    assert result.returncode != 0
    reason = (opt_ml / "output" / "failure").read_text()
    assert 0 < len(reason) <= 1024
    assert "Traceback" not in reason and "\n" not in reason.strip()
    assert "Akita" in reason or "Airedale" in reason, reason
    assert not (opt_ml / "model" / "kennel.json").exists()


def test_bad_hyperparameter_is_a_clear_failure(train_image, tmp_path):
    opt_ml = hand_made_opt_ml(tmp_path / "ml", sagemaker_strings({**TINY, "epoch": "3"}))
    tiny_dataset(opt_ml / "input" / "data" / "training")
    result = docker_run(train_image, "train", volumes={opt_ml: "/opt/ml"}, timeout=600, check=False)
    assert result.returncode != 0
    reason = (opt_ml / "output" / "failure").read_text()
    assert "unknown hyperparameter 'epoch'" in reason and "epochs" in reason, reason


def test_sigterm_mid_epoch_checkpoints_and_a_rerun_resumes(train_image, tmp_path):
    """docker stop (SIGTERM, as SageMaker's stop and spot interruptions) mid-epoch, then the same job again."""
    import subprocess
    import time

    settings = {**TINY, "epochs": "2", "batch_size": "1", "progress_interval": "1"}
    opt_ml = hand_made_opt_ml(tmp_path / "ml", sagemaker_strings(settings))
    tiny_dataset(opt_ml / "input" / "data" / "training", per_split={"train": 12, "valid": 2, "test": 2})
    name = f"kennel-sigterm-{tmp_path.name[-12:]}".lower()
    run(["docker", "run", "-d", "--name", name, "-v", f"{opt_ml}:/opt/ml", train_image, "train"], timeout=60)
    try:
        deadline = time.monotonic() + 300
        logs = ""
        while "progress train epoch=1/2 step=3/" not in logs:
            assert time.monotonic() < deadline, f"no training progress within 300 s:\n{logs[-3000:]}"
            time.sleep(0.5)
            logs = run(["docker", "logs", name], timeout=60).stdout
        run(["docker", "kill", "--signal", "TERM", name], timeout=60)
        exit_code = int(run(["docker", "wait", name], timeout=150).stdout.strip())
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=60).stdout
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
    assert exit_code != 0, logs[-3000:]
    assert "received SIGTERM" in logs
    partial = sorted(p.name for p in (opt_ml / "checkpoints").glob("epoch-0001-step-*.pt"))
    assert len(partial) == 1, sorted(p.name for p in (opt_ml / "checkpoints").iterdir())
    assert (opt_ml / "checkpoints" / partial[0]).with_suffix(".json").is_file()
    reason = (opt_ml / "output" / "failure").read_text()
    assert "SIGTERM" in reason and "\n" not in reason.strip(), reason
    assert not (opt_ml / "model" / "kennel.json").exists()

    (opt_ml / "output" / "failure").unlink()  # SageMaker gives a restarted job a fresh output folder
    step = int(partial[0].split("-step-")[1].split(".")[0])
    rerun = docker_run(train_image, "train", volumes={opt_ml: "/opt/ml"}, timeout=900)
    assert f"epoch 1 step {step}" in rerun.stdout, rerun.stdout[-3000:]
    # Resumed after the saved step: epoch 1 does not start over from step 1.
    assert "progress train epoch=1/2 step=1/" not in rerun.stdout
    assert "progress train epoch=2/2 step=1/" in rerun.stdout
    assert_model_artifacts(opt_ml / "model", opt_ml / "output", SAMPLE_BREEDS[:3])
    assert sorted(p.name for p in (opt_ml / "checkpoints").glob("*.pt"))[-1] == "epoch-0002.pt"
