"""kennel_train.device and progress: CPUs the container really has, precision choice, log lines and the TTY bar."""
from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from kennel_train import device, progress
from kennel_train.failure import TrainingFailure


def test_bf16_is_chosen_on_the_cpu_only_with_bf16_hardware(tmp_path):
    (tmp_path / "avx2").write_text("flags\t\t: fpu sse avx2 fma\n")
    (tmp_path / "amx").write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert not device.cpu_has_native_bf16(tmp_path / "avx2")
    assert device.cpu_has_native_bf16(tmp_path / "amx")
    assert not device.cpu_has_native_bf16(tmp_path / "absent")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cpu_runtime_sets_threads_and_refuses_what_needs_a_gpu():
    before = torch.get_num_threads()
    try:
        runtime = device.select("auto", "fp32")
        assert runtime.device == torch.device("cpu") and runtime.precision == "fp32"
        assert torch.get_num_threads() == runtime.threads == device.usable_cpus()
        assert device.select("cpu", "bf16").precision == "bf16"
        assert device.select("auto", "auto").precision == ("bf16" if device.cpu_has_native_bf16() else "fp32")
        with pytest.raises(TrainingFailure, match="device=cuda but no CUDA GPU is visible"):
            device.select("cuda", "auto")
        with pytest.raises(TrainingFailure, match="mixed_precision=fp16 needs a CUDA GPU"):
            device.select("cpu", "fp16")
    finally:
        torch.set_num_threads(before)


def test_autocast_is_a_no_op_in_fp32_and_bf16_otherwise():
    runtime = device.Runtime(torch.device("cpu"), "bf16", 1, 1)
    with runtime.autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with runtime.autocast(enabled=False):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with device.Runtime(torch.device("cpu"), "fp32", 1, 1).autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_every_interval_and_at_the_end():
    stream = io.StringIO()
    progress.configure_logging(stream)
    try:
        tracker = progress.Progress("train", 2, 5, total_steps=5, interval=2, stream=stream)
        for step in range(1, 6):
            tracker.step(step, 4, lambda: 0.5)
        tracker.finish()
    finally:
        progress.configure_logging()
    lines = stream.getvalue().splitlines()
    assert [line.split(" images_per_second")[0] for line in lines[:2]] == [
        "progress train epoch=2/5 step=2/5", "progress train epoch=2/5 step=4/5"]
    assert lines[0].endswith(" running_loss=0.5000") and " eta=0:00:0" in lines[0]
    assert lines[2].startswith("progress train epoch=2/5 done images=20 seconds=")
    assert "\r" not in stream.getvalue()


def test_a_terminal_gets_a_bar_that_log_lines_never_mix_with():
    terminal = FakeTerminal()
    progress.configure_logging(terminal)
    try:
        tracker = progress.Progress("valid", 1, 1, total_steps=4, interval=2, stream=terminal)
        tracker.step(1, 8)
        tracker.step(2, 8)  # a log line is due: the bar is cleared, the line written, the bar drawn again
        tracker.finish()
    finally:
        progress.configure_logging()
    text = terminal.getvalue()
    assert "\rvalid 1/1 [######" in text and "] 1/4 " in text and "img/s eta " in text
    line_start = text.index("progress valid epoch=1/1 step=2/4")
    assert text[:line_start].endswith("\r\x1b[K")  # cleared right before the line
    assert re.search(r"\r\x1b\[Kprogress valid epoch=1/1 done images=16 [^\r]*\n$", text)  # no bar left behind
    assert logging.getLogger("kennel_train").propagate is False


def test_importing_the_training_package_turns_onnx_runtime_telemetry_off():
    env = {key: value for key, value in os.environ.items() if key != "ORT_DISABLE_TELEMETRY"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    script = "import os, kennel_train.model, onnxruntime; print(os.environ.get('ORT_DISABLE_TELEMETRY'))"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
