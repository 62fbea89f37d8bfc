"""Training survives a hard kill and a damaged checkpoint (the training image on a real engine).

kill -9 gives the program no chance to save anything (unlike SIGTERM, which the
training image tests cover): the rerun must resume from the last end-of-epoch
checkpoint and still end with the number of epochs asked for. A checkpoint
damaged after it was written (a half-synced spot-instance upload, a bad disk) is
detected by its checksum and the previous one is used.

Tiny settings (160x120 images, ResNet-18 from random weights, batch 1): each run
takes well under a minute of compute on 2 cores. KENNEL_RESILIENCE_LONG=1 also
tries every kind of damage.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from docker_cli import run

pytestmark = pytest.mark.container

LONG = os.environ.get("KENNEL_RESILIENCE_LONG", "").strip().lower() in ("1", "true", "yes")
EPOCHS = 3
SETTINGS = {"architecture": '"resnet18"', "pretrained": "false", "epochs": str(EPOCHS), "batch_size": "1",
            "workers": "0", "progress_interval": "1"}
BREEDS = ["001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier"]
RUN_TIMEOUT_S = 900


def opt_ml(root: Path) -> Path:
    """/opt/ml as SageMaker lays it out for one host, with a tiny 'training' channel."""
    from kennel_train.sample import generate

    config = root / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(SETTINGS))
    (config / "inputdataconfig.json").write_text(json.dumps(
        {"training": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
                      "RecordWrapperType": "None"}}))
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"}))
    generate(root / "input" / "data" / "training", len(BREEDS), {"train": 10, "valid": 2, "test": 2}, size=(160, 120))
    return root


def kill_when(image: str, ml: Path, marker: str) -> str:
    """Start `train`, SIGKILL it once its log shows `marker`; the log up to the kill."""
    name = f"kennel-kill9-{uuid.uuid4().hex[:8]}"
    run(["docker", "run", "--detach", "--name", name, "--volume", f"{ml}:/opt/ml", image, "train"], timeout=60)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        logs = ""
        while marker not in logs:
            state = json.loads(run(["docker", "inspect", name], timeout=60).stdout)[0]["State"]
            assert state["Running"], f"training ended before {marker!r}:\n{logs[-3000:]}"
            assert time.monotonic() < deadline, f"no {marker!r} within {RUN_TIMEOUT_S} s:\n{logs[-3000:]}"
            time.sleep(0.3)
            logs = run(["docker", "logs", name], timeout=60).stdout
        run(["docker", "kill", "--signal", "KILL", name], timeout=60)
        code = run(["docker", "wait", name], timeout=60).stdout.strip()
        assert code == "137", f"exit {code}: not killed by SIGKILL"
        return run(["docker", "logs", name], timeout=60).stdout
    finally:
        subprocess.run(["docker", "rm", "--force", name], capture_output=True, timeout=60)


def rerun(image: str, ml: Path) -> str:
    failure = ml / "output" / "failure"
    if failure.exists():
        failure.unlink()  # SageMaker gives a restarted job a fresh output folder
    return run(["docker", "run", "--rm", "--volume", f"{ml}:/opt/ml", image, "train"], timeout=RUN_TIMEOUT_S).stdout


def assert_finished_all_epochs(ml: Path, log: str) -> None:
    import kennel_artifact

    metrics = json.loads((ml / "output" / "data" / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == list(range(1, EPOCHS + 1))
    manifest = kennel_artifact.load(ml / "model")  # model.onnx matches its checksum
    assert manifest.metrics["epochs"] == EPOCHS and manifest.class_names == BREEDS
    assert "Testing Loss: " in log
    assert sorted(p.name for p in (ml / "checkpoints").glob("*.pt"))[-1] == f"epoch-{EPOCHS:04d}.pt"


def test_kill9_mid_epoch_resumes_from_the_last_checkpoint(train_image, tmp_path):
    ml = opt_ml(tmp_path / "ml")
    killed_log = kill_when(train_image, ml, f"progress train epoch=2/{EPOCHS} step=3/")
    assert "checkpoint /opt/ml/checkpoints/epoch-0001.pt" in killed_log
    # SIGKILL: nothing was saved mid-epoch, epoch 1's checkpoint is the newest.
    assert sorted(p.name for p in (ml / "checkpoints").glob("*.pt")) == ["epoch-0001.pt"]
    assert not (ml / "model" / "kennel.json").exists()

    log = rerun(train_image, ml)
    assert "resuming from checkpoint epoch-0001.pt (epoch 1 complete)" in log, log[-3000:]
    assert f"progress train epoch=1/{EPOCHS}" not in log  # epoch 1 is not trained again
    assert f"progress train epoch=2/{EPOCHS} step=1/" in log  # epoch 2 starts over
    assert_finished_all_epochs(ml, log)


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    start = len(data) // 2
    data[start:start + 4096] = rng.randbytes(min(4096, len(data) - start))
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _drop_sidecar(path: Path) -> None:
    path.with_suffix(".json").unlink()


def _garble_sidecar(path: Path) -> None:
    path.with_suffix(".json").write_text("{not json")


DAMAGE = {"flipped bytes": (_flip_bytes, "checksum mismatch"), "truncated": (_truncate, "checksum mismatch"),
          "empty file": (_empty, "checksum mismatch"), "sidecar missing": (_drop_sidecar, "is missing"),
          "sidecar garbled": (_garble_sidecar, "is unreadable")}


@pytest.mark.parametrize("damage", list(DAMAGE) if LONG else ["flipped bytes"])
def test_damaged_newest_checkpoint_is_detected_and_the_previous_one_used(train_image, tmp_path, damage):
    ml = opt_ml(tmp_path / "ml")
    kill_when(train_image, ml, f"progress train epoch=3/{EPOCHS} step=2/")
    newest = ml / "checkpoints" / "epoch-0002.pt"
    assert sorted(p.name for p in (ml / "checkpoints").glob("*.pt")) == ["epoch-0001.pt", "epoch-0002.pt"]
    corrupt, reason = DAMAGE[damage]
    corrupt(newest)

    log = rerun(train_image, ml)
    assert f"checkpoint epoch-0002.pt is unusable ({reason}" in log, log[-3000:]
    assert "resuming from checkpoint epoch-0001.pt (epoch 1 complete)" in log
    assert f"progress train epoch=2/{EPOCHS} step=1/" in log
    assert_finished_all_epochs(ml, log)
