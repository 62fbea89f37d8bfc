"""The whole program in-process (python -m kennel_train's cli): log lines, MetricDefinitions, outputs, failures."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

import kennel_artifact
from kennel_train import loop, main as program

METRIC_DEFINITIONS = Path(program.__file__).with_name("metric_definitions.json")
EPOCHS = 2


def run_cli(base: Path, monkeypatch, *flags: str) -> tuple[int, str]:
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(base))
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = program.cli(list(flags))
    return code, output.getvalue()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, generated_dataset):
    """One short real run on the generated dataset: (base dir, exit code, log)."""
    base = tmp_path_factory.mktemp("opt_ml")
    (base / "input" / "data").mkdir(parents=True)
    (base / "input" / "data" / "training").symlink_to(generated_dataset)
    with pytest.MonkeyPatch.context() as monkeypatch:
        code, log = run_cli(base, monkeypatch, "--architecture", "resnet18", "--pretrained", "false", "--epochs",
                            str(EPOCHS), "--batch-size", "4", "--workers", "0", "--progress-interval", "2",
                            "--learning-rate", "0.01")
    return base, code, log


def test_the_run_succeeds_and_logs_settings_with_their_source(finished_run):
    _, code, log = finished_run
    assert code == 0, log
    assert "setting architecture=resnet18 (--architecture)" in log
    assert "setting optimizer=adam (default)" in log
    assert log.rstrip().endswith("training complete")


def test_metric_definitions_fit_sagemaker_limits():
    definitions = json.loads(METRIC_DEFINITIONS.read_text())
    assert 0 < len(definitions) <= 40
    assert all(set(d) == {"Name", "Regex"} and len(d["Regex"]) <= 500 for d in definitions)
    assert {"Name": "test:loss", "Regex": r"Testing Loss: ([0-9\.]+)"} in definitions  # the original tuning regex
    assert len({d["Name"] for d in definitions}) == len(definitions)


def test_every_metric_definition_matches_the_real_log_with_the_recorded_values(finished_run):
    base, _, log = finished_run
    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    expected = {
        "train:loss": [row["train_loss"] for row in metrics["epochs"]],
        "train:accuracy": [row["train_accuracy"] for row in metrics["epochs"]],
        "valid:loss": [row["valid_loss"] for row in metrics["epochs"]],
        "valid:accuracy": [row["valid_accuracy"] for row in metrics["epochs"]],
        "test:loss": [metrics["test"]["loss"]],
        "test:accuracy": [metrics["test"]["accuracy"]],
        "train:images_per_second": [row["train_images_per_second"] for row in metrics["epochs"]],
        "epoch": [1.0, 2.0],
    }
    definitions = json.loads(METRIC_DEFINITIONS.read_text())
    assert {d["Name"] for d in definitions} == set(expected)
    for definition in definitions:
        # SageMaker applies each regex per log line and takes the first group.
        found = [float(m.group(1)) for line in log.splitlines() if (m := re.search(definition["Regex"], line))]
        want = expected[definition["Name"]]
        assert found == pytest.approx(want, abs=0.051 if "images" in definition["Name"] else 5e-5), definition


def test_one_line_per_split_per_epoch_and_the_original_test_lines(finished_run):
    _, _, log = finished_run
    lines = log.splitlines()
    assert sum(bool(re.fullmatch(r"epoch=\d+ train_loss=\d+\.\d{4} train_accuracy=\d\.\d{4}", l)) for l in lines) \
        == EPOCHS
    assert sum(bool(re.fullmatch(r"epoch=\d+ valid_loss=\d+\.\d{4} valid_accuracy=\d\.\d{4}", l)) for l in lines) \
        == EPOCHS
    assert sum(bool(re.fullmatch(r"Testing Loss: \d+\.\d{4}", line)) for line in lines) == 1
    assert sum(bool(re.fullmatch(r"Testing Accuracy: \d\.\d{4}", line)) for line in lines) == 1
    # Progress every 2 steps (18 training images / batch 4 = 5 steps) and per pass, with images/s and an ETA.
    assert re.search(r"^progress train epoch=1/2 step=2/5 images_per_second=[\d.]+ eta=\d:\d\d:\d\d "
                     r"running_loss=[\d.]+$", log, re.M)
    assert re.search(r"^progress epoch=1/2 train_images_per_second=[\d.]+ epoch_seconds=[\d.]+ eta=\d:\d\d:\d\d$",
                     log, re.M)
    assert "\r" not in log  # no progress bar: stdout is not a terminal


def test_the_model_directory_is_complete_and_describes_the_run(finished_run, generated_dataset):
    base, _, _ = finished_run
    manifest = kennel_artifact.load(base / "model")
    assert manifest.class_names == ["001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier"]
    assert manifest.preprocessing == kennel_artifact.IMAGENET_EVAL
    assert manifest.hyperparameters["learning_rate"] == 0.01 and manifest.hyperparameters["epochs"] == EPOCHS
    assert manifest.data["splits"]["train"] == {"images": 18, "files": 18, "unreadable": 0}
    assert manifest.metrics["onnx_max_abs_diff"] <= manifest.metrics["onnx_tolerance"]
    # freeze_backbone=true (the default): the backbone ships apart for multi-model endpoints.
    assert manifest.shares_backbone and manifest.metrics["split_onnx_max_abs_diff"] <= manifest.metrics["onnx_tolerance"]
    assert manifest.metrics["epochs"] == EPOCHS and 0 <= manifest.metrics["test_accuracy"] <= 1
    assert {"torch", "torchvision", "onnxruntime", "python"} <= set(manifest.versions)


def test_reports_in_output_data(finished_run):
    base, _, _ = finished_run
    data = base / "output" / "data"
    metrics = json.loads((data / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    assert metrics["test"]["images"] == 6 and metrics["test"]["precision"] == "fp32"
    assert (data / "training-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((data / "per-class-accuracy.json").read_text())
    assert [row["images"] for row in rows] == [2, 2, 2]
    assert sum(row["correct"] for row in rows) == round(metrics["test"]["accuracy"] * 6)
    csv_lines = (data / "per-class-accuracy.csv").read_text().splitlines()
    assert csv_lines[0] == "index,class_name,images,correct,accuracy" and len(csv_lines) == 4
    assert not (base / "output" / "failure").exists()


def test_tensorboard_has_the_epoch_curves(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base, _, _ = finished_run
    events = EventAccumulator(str(base / "output" / "tensorboard"))
    events.Reload()
    expected = {"loss/train", "loss/valid", "accuracy/train", "accuracy/valid", "loss/test"}
    assert expected <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("loss/valid")] == [1, 2]


def test_checkpoints_after_each_epoch(finished_run):
    base, _, _ = finished_run
    assert sorted(p.name for p in (base / "checkpoints").iterdir()) == [
        "epoch-0001.json", "epoch-0001.pt", "epoch-0002.json", "epoch-0002.pt"]


def test_a_finished_run_run_again_tests_and_exports_without_training(finished_run, tmp_path, monkeypatch):
    base, _, _ = finished_run
    code, log = run_cli(base, monkeypatch, "--architecture", "resnet18", "--pretrained", "false", "--epochs",
                        str(EPOCHS), "--workers", "0")
    assert code == 0
    assert "resuming from checkpoint epoch-0002.pt (epoch 2 complete)" in log
    assert "train_loss=" not in log and "Testing Loss: " in log


def failing_run(tmp_path, monkeypatch, generated_dataset, error: BaseException) -> tuple[int, str, str]:
    base = tmp_path / "opt_ml"
    (base / "input" / "data").mkdir(parents=True)
    (base / "input" / "data" / "training").symlink_to(generated_dataset)

    def raise_it(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(loop, "train_one_epoch", raise_it)
    code, log = run_cli(base, monkeypatch, "--architecture", "resnet18", "--pretrained", "false", "--workers", "0",
                        "--batch-size", "256")
    return code, (base / "output" / "failure").read_text(), log


def test_out_of_memory_is_a_reason_with_advice(tmp_path, monkeypatch, generated_dataset):
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    code, reason, _ = failing_run(tmp_path, monkeypatch, generated_dataset, error)
    assert code == 1
    assert reason.startswith("out of memory (batch_size=256, resnet18, cpu (cpu, ")
    assert "lower batch_size (or workers), or use an instance with more memory" in reason


def test_an_unexpected_error_is_an_internal_error_line_and_a_logged_traceback(tmp_path, monkeypatch,
                                                                               generated_dataset):
    code, reason, log = failing_run(tmp_path, monkeypatch, generated_dataset, ValueError("unexpected\nthing"))
    assert code == 1
    assert reason == "internal error: ValueError: unexpected thing"
    assert "Traceback (most recent call last)" in log and "raise_it" in log


def test_a_stop_during_validation_keeps_the_finished_training_pass(tmp_path, monkeypatch, generated_dataset):
    import os
    import signal

    base = tmp_path / "opt_ml"
    (base / "input" / "data").mkdir(parents=True)
    (base / "input" / "data" / "training").symlink_to(generated_dataset)
    real_evaluate = loop.evaluate

    def sigterm_at_first_validation(model, loader, phase, epoch, *args, **kwargs):
        if phase == "valid" and epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as SageMaker would, while validation runs
        return real_evaluate(model, loader, phase, epoch, *args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", sigterm_at_first_validation)
    flags = ["--architecture", "resnet18", "--pretrained", "false", "--epochs", "2", "--batch-size", "4",
             "--workers", "0"]
    code, log = run_cli(base, monkeypatch, *flags)
    assert code == 128 + signal.SIGTERM
    reason = (base / "output" / "failure").read_text()
    assert reason.startswith("stopped by SIGTERM at epoch 1 step 5 (valid); checkpoint saved to ")
    assert "epoch=1 train_loss" not in log  # the epoch did not finish: no metric line yet

    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    code, log = run_cli(base, monkeypatch, *flags)
    assert code == 0, log
    assert "resuming from checkpoint epoch-0001-step-000005.pt (epoch 1 step 5)" in log
    assert "progress train epoch=1/2 done images=0 " in log  # the training pass was not repeated
    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    assert not (base / "output" / "failure").exists()
