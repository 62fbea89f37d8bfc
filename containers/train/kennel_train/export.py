"""Write the model directory (what becomes model.tar.gz) in the format kennel_artifact defines.

    model.pth    the network's state_dict (CPU, float32, standard layout)
    model.onnx   the serving export: input "images" [N, 3, H, W], output "logits" [N, classes], N dynamic
    kennel.json  the manifest, written last: a directory with a manifest is complete

The ONNX file is checked before it is installed: ONNX Runtime and PyTorch run
the same real evaluation images (a batch and a single image, which also proves
the dynamic batch axis), and the export fails when their logits differ by more
than the tolerance. The measured difference goes into the manifest.

Exporter: torch.onnx.export(..., dynamo=False), the TorchScript-based exporter.
With torch 2.14 and onnxscript 0.7.2 both exporters give the same logits for
every ResNet here (max abs difference ~1e-5), but the dynamo exporter took
10.5 s for ResNet-18 and 12 s for ResNet-50 against 0.9 s and 4.1 s, and the
parity check above guards the result whichever exporter wrote it.
"""
from __future__ import annotations

import copy
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch

import kennel_artifact
from kennel_artifact import Manifest

from . import atomic
from .checkpoint import cpu_state_dict
from .failure import TrainingFailure

OPSET = 17
# Relative to the largest logit: float32 kernels of ONNX Runtime and PyTorch sum in
# different orders, so differences grow with the size of the values.
TOLERANCE = 1e-3


def serving_copy(network: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU copy in eval mode and the standard memory layout; the training network is left alone."""
    clone = copy.deepcopy(network).to("cpu", dtype=torch.float32, memory_format=torch.contiguous_format)
    return clone.eval()


def export_onnx(network: torch.nn.Module, path: Path, input_size: tuple[int, int]) -> None:
    example = torch.zeros(1, 3, *input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(network, (example,), str(path), input_names=[kennel_artifact.ONNX_INPUT],
                          output_names=[kennel_artifact.ONNX_OUTPUT], opset_version=OPSET, dynamo=False,
                          dynamic_axes={kennel_artifact.ONNX_INPUT: {0: "batch"},
                                        kennel_artifact.ONNX_OUTPUT: {0: "batch"}},
                          do_constant_folding=True)


def compare_with_onnx(network: torch.nn.Module, onnx_path: Path, images: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, tolerance) between PyTorch and ONNX Runtime logits on ``images``."""
    import onnxruntime  # only training imports it here; serving has its own

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    batch = images.numpy().astype(np.float32)
    with torch.inference_mode():
        expected = network(images).numpy()
    got_batch = session.run([kennel_artifact.ONNX_OUTPUT], {kennel_artifact.ONNX_INPUT: batch})[0]
    got_single = session.run([kennel_artifact.ONNX_OUTPUT], {kennel_artifact.ONNX_INPUT: batch[:1]})[0]
    if got_batch.shape != expected.shape or got_single.shape != expected[:1].shape:
        raise TrainingFailure(f"the ONNX export gives logits of shape {got_batch.shape} / {got_single.shape}, "
                              f"PyTorch {expected.shape}")
    difference = float(max(np.abs(got_batch - expected).max(), np.abs(got_single - expected[:1]).max()))
    tolerance = TOLERANCE * max(1.0, float(np.abs(expected).max()))
    return difference, tolerance


def _save_state_dict(network: torch.nn.Module, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(cpu_state_dict(network), buffer)
    atomic.write_bytes(path, buffer.getvalue())


def write_model_dir(model_dir: Path, network: torch.nn.Module, manifest: Manifest,
                    check_images: torch.Tensor) -> dict[str, float]:
    """model.pth, the verified model.onnx, then kennel.json; returns the parity figures (also in the manifest)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    network = serving_copy(network)
    _save_state_dict(network, model_dir / kennel_artifact.WEIGHTS_FILE)
    staged = model_dir / f".model.{os.getpid()}.onnx"
    try:
        export_onnx(network, staged, manifest.preprocessing.input_size)
        difference, tolerance = compare_with_onnx(network, staged, check_images)
        if not difference <= tolerance:  # also catches NaN
            raise TrainingFailure(f"the ONNX export does not reproduce the PyTorch model: max abs difference "
                                  f"{difference:.3g} on {len(check_images)} evaluation images exceeds {tolerance:.3g}")
        os.replace(staged, model_dir / kennel_artifact.ONNX_FILE)
    finally:
        staged.unlink(missing_ok=True)
    parity = {"onnx_max_abs_diff": difference, "onnx_tolerance": tolerance, "onnx_check_images": len(check_images)}
    manifest.metrics = {**manifest.metrics, **parity}
    kennel_artifact.write_manifest(model_dir, manifest)
    return parity
