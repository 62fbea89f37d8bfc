"""The SageMaker training contract end to end on the host: the real sagemaker-training toolkit's `train`
(the console script SageMaker runs in the image) imports kennel_train.main from SAGEMAKER_TRAINING_MODULE
and runs it against a temporary /opt/ml (SAGEMAKER_BASE_DIR)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

import kennel_artifact
from kennel_train.export import backbone_identity

REPO = Path(__file__).resolve().parents[2]
TRAIN = Path(sys.executable).with_name("train")  # sagemaker-training's console script
QUICK = {"architecture": "resnet18", "pretrained": False, "epochs": 1, "batch_size": 4, "workers": 0}


def toolkit_env(base: Path, tmp_path: Path, module: str = "kennel_train.main:main") -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KENNEL_", "SM_", "SAGEMAKER_"))}
    env.update(SAGEMAKER_BASE_DIR=str(base), SAGEMAKER_TRAINING_MODULE=module,
               PYTHONPATH=os.pathsep.join(str(REPO / p) for p in ("containers/artifact", "containers/train",
                                                                  "tests/contract")),
               TORCH_HOME=str(tmp_path / "torch-home"),  # an empty hub cache: nothing pretrained by accident
               MPLCONFIGDIR=str(tmp_path / "mpl"))
    return env


def train(base: Path, tmp_path: Path, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(TRAIN)], env=toolkit_env(base, tmp_path, **kwargs), capture_output=True, text=True,
                          timeout=timeout)


def failure_of(base: Path) -> str:
    return (base / "output" / "failure").read_text()


# --------------------------------------------------------------------------- success


def test_original_layout_string_hyperparameters_writes_every_artifact(opt_ml, generated_dataset, tmp_path):
    base = opt_ml(generated_dataset, "training", raw_hyperparameters={
        "architecture": '"resnet18"', "pretrained": "false", "epochs": "1", "batch_size": "4", "workers": "1",
        "learning_rate": "0.01", "optimizer": '"adamw"', "sagemaker_job_name": '"kennel-contract"',
        "sagemaker_region": '"us-east-1"'})
    result = train(base, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Reporting training SUCCESS" in result.stderr + result.stdout
    assert (base / "output" / "success").exists() and not (base / "output" / "failure").exists()
    manifest = kennel_artifact.load(base / "model")
    assert manifest.architecture == "resnet18" and len(manifest.class_names) == 3
    assert manifest.hyperparameters["optimizer"] == "adamw" and manifest.hyperparameters["learning_rate"] == 0.01
    assert (base / "model" / "model.pth").is_file()
    assert kennel_artifact.load_split(base / "model").backbone["features"] == 512  # freeze_backbone=true by default
    assert sorted(p.name for p in (base / "output" / "data").iterdir()) == [
        "metrics.json", "per-class-accuracy.csv", "per-class-accuracy.json", "training-curves.png"]
    assert list((base / "output" / "tensorboard").glob("events.out.tfevents.*"))
    assert (base / "checkpoints" / "epoch-0001.pt").is_file()
    assert "Testing Loss: " in result.stdout
    # INT8 (on by default): built after export, gated, and the decision recorded with both figures either way.
    decision = manifest.int8
    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    assert metrics["int8"] == decision
    assert {"shipped", "reason", "fp32_top1", "int8_top1", "agreement", "calibration_images", "seconds"} <= set(decision)
    assert decision["calibration_images"] == 18 and decision["validation_images"] == 6
    assert (base / "model" / "model.int8.onnx").is_file() == decision["shipped"] == manifest.has_int8
    assert ("int8 shipped: " if decision["shipped"] else "int8 not shipped: ") + "fp32_top1=" in result.stdout


def test_separate_channels_pretrained_channel_and_skipped_images(opt_ml, generated_dataset, tmp_path):
    data = shutil.copytree(generated_dataset, tmp_path / "data")
    (data / "train" / "001.Affenpinscher" / "not-an-image.jpg").write_text("plain text")
    first = sorted((data / "train" / "002.Afghan_hound").glob("*.jpg"))[0]
    (data / "train" / "002.Afghan_hound" / "truncated.jpg").write_bytes(first.read_bytes()[:1500])
    base = opt_ml(data, "separate", hyperparameters={**QUICK, "pretrained": True, "workers": 1,
                                                     "max_unreadable_fraction": 0.2, "int8": False})
    torch.manual_seed(3)
    weights = torchvision.models.resnet18().state_dict()  # stands in for the ImageNet file: any name will do
    (base / "input" / "data" / "pretrained").mkdir()
    torch.save(weights, base / "input" / "data" / "pretrained" / "my-backbone.pth")
    result = train(base, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data: channels 'train', 'valid', 'test'; 3 classes" in result.stdout
    assert "pretrained backbone weights: " in result.stdout and "my-backbone.pth" in result.stdout
    exported = torch.load(base / "model" / "model.pth", weights_only=True)
    assert all(torch.equal(exported[key], value) for key, value in weights.items()
               if not key.startswith("fc.") and "num_batches_tracked" not in key)
    # The backbone stayed frozen, BatchNorm statistics included: its identity is the pretrained file's.
    assert kennel_artifact.load_split(base / "model").backbone["sha256"] == backbone_identity(weights, (224, 224))
    counts = kennel_artifact.load(base / "model").data["splits"]["train"]
    assert counts == {"images": 18, "files": 20, "unreadable": 2}  # one found by its header, one while decoding
    # KENNEL_INT8=false: FP32 only, and the manifest says why.
    assert kennel_artifact.load(base / "model").int8 == {"shipped": False,
                                                          "reason": "turned off by the setting int8=false"}
    assert not (base / "model" / "model.int8.onnx").exists()


# --------------------------------------------------------------------------- failures


def _copy_without(generated_dataset, tmp_path, *relative: str) -> Path:
    data = shutil.copytree(generated_dataset, tmp_path / "data")
    for path in relative:
        target = data / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return data


def _no_valid_images(generated_dataset, tmp_path):
    data = shutil.copytree(generated_dataset, tmp_path / "data")
    for image in (data / "valid").rglob("*.jpg"):
        image.unlink()
    return data


def _mostly_unreadable(generated_dataset, tmp_path):
    data = shutil.copytree(generated_dataset, tmp_path / "data")
    for i in range(3):
        (data / "train" / "003.Airedale_terrier" / f"broken-{i}.jpg").write_bytes(b"\xff\xd8 not really")
    return data


FAILURES = {
    "no channel": (lambda d, t: None, "training", {},
                   "missing channel 'training': give one 'training' channel holding train/ valid/ test/"),
    "missing test channel": (lambda d, t: _copy_without(d, t, "test"), "separate", {}, "missing channel 'test'"),
    "no images": (_no_valid_images, "training", {}, "no images in valid/"),
    "classes differ": (lambda d, t: _copy_without(d, t, "test/002.Afghan_hound"), "training", {},
                       "the splits' classes differ: test/ lacks 1 of train/'s classes (002.Afghan_hound)"),
    "unreadable images": (_mostly_unreadable, "training", {},
                          "3 of 21 images in train/ cannot be read (14.3%, more than max_unreadable_fraction=0.01)"),
    "bad value": (lambda d, t: d, "training", {"batch_size": '"lots"'},
                  "hyperparameter batch_size='\"lots\"' (hyperparameters.json) is invalid: expected an integer"),
    "unknown key": (lambda d, t: d, "training", {"learning-rate": "0.1"},
                    "unknown hyperparameter 'learning-rate' in hyperparameters.json (did you mean 'learning_rate'?)"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_each_failure_has_its_own_reason_and_a_non_zero_exit(case, opt_ml, generated_dataset, tmp_path):
    make_data, layout, overrides, expected = FAILURES[case]
    raw = {key: json.dumps(value) for key, value in QUICK.items()}
    base = opt_ml(make_data(generated_dataset, tmp_path), layout, raw_hyperparameters={**raw, **overrides})
    result = train(base, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    reason = failure_of(base)
    assert expected in reason
    assert "\n" not in reason and len(reason) <= 1024 and "Traceback" not in reason
    assert "Framework Error" not in result.stdout + result.stderr  # the toolkit did not write its own reason
    assert not (base / "output" / "success").exists() and not (base / "model" / "kennel.json").exists()


def test_missing_pretrained_weights_fail_saying_how_to_provide_them(opt_ml, generated_dataset, tmp_path):
    base = opt_ml(generated_dataset, "training", hyperparameters={**QUICK, "pretrained": True})
    assert train(base, tmp_path).returncode == 1
    reason = failure_of(base)
    assert reason.startswith("pretrained weights for resnet18 are not available offline")
    assert "add a 'pretrained' channel holding the torchvision state_dict resnet18-f37072fd.pth " \
           "(https://download.pytorch.org/models/resnet18-f37072fd.pth)" in reason
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in reason and "or set pretrained=false" in reason


def test_out_of_memory_through_the_toolkit(opt_ml, generated_dataset, tmp_path):
    # A real allocation failure cannot be produced reliably on a shared host (RLIMIT_AS gives segfaults and
    # silent exits instead), so the entry module raises torch's own OutOfMemoryError from the training step.
    base = opt_ml(generated_dataset, "training", hyperparameters={**QUICK, "batch_size": 512})
    result = train(base, tmp_path, module="oom_entry:main")
    assert result.returncode == 1
    reason = failure_of(base)
    assert reason.startswith("out of memory (batch_size=512, resnet18, cpu")
    assert "lower batch_size (or workers), or use an instance with more memory" in reason


# --------------------------------------------------------------------------- stop and resume


def test_sigterm_mid_epoch_saves_a_checkpoint_and_a_rerun_resumes_to_the_same_total(opt_ml, generated_dataset,
                                                                                      tmp_path):
    base = opt_ml(generated_dataset, "training", hyperparameters={**QUICK, "epochs": 2, "batch_size": 2,
                                                                  "progress_interval": 1, "workers": 1})
    process = subprocess.Popen([str(TRAIN)], env=toolkit_env(base, tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("progress train epoch=1/2 step=3/"):
                break
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        lines += process.stdout.readlines()
        code = process.wait(timeout=120)
        stopped_in = time.monotonic() - sent
    finally:
        process.kill()
    log = "".join(lines)
    assert code == 1, log
    assert stopped_in < 60  # SageMaker sends SIGKILL 120 s after SIGTERM
    reason = failure_of(base)
    assert reason.startswith("stopped by SIGTERM at epoch 1 step ")
    step = int(reason.split("step ")[1].split(" ")[0])
    assert 3 <= step < 9
    checkpoint = base / "checkpoints" / f"epoch-0001-step-{step:06d}.pt"
    assert f"checkpoint saved to {checkpoint}" in reason and checkpoint.is_file()
    assert not (base / "model" / "kennel.json").exists()

    rerun = train(base, tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming from checkpoint {checkpoint.name} (epoch 1 step {step})" in rerun.stdout
    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    assert not (base / "output" / "failure").exists() and (base / "output" / "success").exists()
    assert kennel_artifact.load(base / "model").metrics["epochs"] == 2
    assert sorted(p.name for p in (base / "checkpoints").glob("*.pt")) == ["epoch-0001.pt", "epoch-0002.pt"]
