"""Write the model directory (what becomes model.tar.gz) in the format kennel_artifact defines.

    model.pth      the network's state_dict (CPU, float32, standard layout)
    model.onnx     the serving export: input "images" [N, 3, H, W], output "logits" [N, classes], N dynamic
    backbone.onnx  model.onnx up to the pooled features: output "features" [N, F], N dynamic
    head.onnx      the rest: input "features", output "logits"; both only when training froze the backbone
    kennel.json    the manifest, written last: a directory with a manifest is complete

The ONNX file is checked before it is installed: ONNX Runtime and PyTorch run
the same real evaluation images (a batch and a single image, which also proves
the dynamic batch axis), and the export fails when their logits differ by more
than the tolerance. The measured difference goes into the manifest.

A frozen backbone (freeze_backbone=true, and every model of the original
system) is the same in every model trained from the same weights, so a
multi-model endpoint keeps one resident and loads each model's head only. The
two graphs are cut from the checked model.onnx, its nodes and weights as they
are (no second export), and checked the same way: backbone then head in ONNX
Runtime against the PyTorch logits. The manifest's ``backbone`` record holds
the identity that says which models share it (backbone_identity).

Exporter: torch.onnx.export(..., dynamo=False), the TorchScript-based exporter.
With torch 2.14 and onnxscript 0.7.2 both exporters give the same logits for
every ResNet here (max abs difference ~1e-5), but the dynamo exporter took
10.5 s for ResNet-18 and 12 s for ResNet-50 against 0.9 s and 4.1 s, and the
parity check above guards the result whichever exporter wrote it.
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

import kennel_artifact
from kennel_artifact import BACKBONE_FILE, FEATURES, HEAD_FILE, ONNX_FILE, ONNX_INPUT, ONNX_OUTPUT, Manifest

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
        torch.onnx.export(network, (example,), str(path), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          opset_version=OPSET, dynamo=False,
                          dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                          do_constant_folding=True)


def backbone_identity(state: Mapping[str, torch.Tensor], input_size: tuple[int, int]) -> str:
    """What makes two models' backbone.onnx interchangeable: sha256 of the backbone's weights and the input size.

    ``state`` is the network's state_dict; everything but the head ``fc`` counts, in
    the state_dict's order: each tensor's name, dtype, shape and bytes, as float32 on
    the CPU. BatchNorm's ``num_batches_tracked`` is left out (inference never reads
    it). The input size counts because the graph is exported for it.
    """
    digest = hashlib.sha256()
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        tensor = value.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.numpy())
    height, width = input_size
    digest.update(f"input_size\0{height}x{width}".encode())
    return digest.hexdigest()


def head_features(network: torch.nn.Module) -> int:
    """F, the width of the pooled features: the head's first Linear reads them."""
    return next(m for m in network.fc.modules() if isinstance(m, torch.nn.Linear)).in_features


def split_onnx(onnx_path: Path, features: int) -> tuple[bytes, bytes]:
    """(backbone.onnx, head.onnx) cut from the serving export at the pooled features, its one Flatten's output."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    cuts = [node.output[0] for node in graph.node if node.op_type == "Flatten"]
    if len(cuts) != 1:
        raise TrainingFailure(f"cannot cut {ONNX_FILE} at the pooled features: it has {len(cuts)} Flatten nodes, "
                              "a ResNet has one")
    cut = cuts[0]
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output}
    weights = {tensor.name for tensor in graph.initializer}
    features_info = helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", features])

    def part(name: str, inputs: list, outputs: list, start: str, end: str) -> bytes:
        """The nodes that compute ``end`` from ``start`` (and the weights), as a model of its own."""
        needed, pending = set(), [end]
        while pending:
            index = producer.get(pending.pop())
            if index is not None and index not in needed:
                needed.add(index)
                pending.extend(n for n in graph.node[index].input if n != start)
        nodes = [graph.node[index] for index in sorted(needed)]  # the graph's order is topological
        consumed = {n for node in nodes for n in node.input if n}
        free = consumed - {n for node in nodes for n in node.output} - weights
        if free != {start}:
            raise TrainingFailure(f"cannot cut {ONNX_FILE} at the pooled features: {name} would need "
                                  f"{', '.join(sorted(free)) or 'no input'}, not {start} alone")
        renamed = []
        for node in nodes:
            copied = onnx.NodeProto()
            copied.CopyFrom(node)
            for names in (copied.input, copied.output):
                for i, value in enumerate(names):
                    if value == cut:
                        names[i] = FEATURES
            renamed.append(copied)
        initializers = [tensor for tensor in graph.initializer if tensor.name in consumed]
        made = helper.make_model(helper.make_graph(renamed, name, inputs, outputs, initializers),
                                 opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                 producer_name=model.producer_name, producer_version=model.producer_version)
        return made.SerializeToString()

    images = [info for info in graph.input if info.name == ONNX_INPUT]
    logits = [info for info in graph.output if info.name == ONNX_OUTPUT]
    return (part("backbone", images, [features_info], ONNX_INPUT, cut),
            part("head", [features_info], logits, cut, ONNX_OUTPUT))


def _session(model: Path | bytes):
    import onnxruntime  # only training imports it here; serving has its own

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def check_parity(what: str, infer: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                 expected: np.ndarray) -> tuple[float, float]:
    """(max abs difference, tolerance) of ``infer``'s logits against PyTorch's ``expected``, on the batch and
    on its first image alone; TrainingFailure when they differ by more than the tolerance."""
    got_batch, got_single = infer(images), infer(images[:1])
    if got_batch.shape != expected.shape or got_single.shape != expected[:1].shape:
        raise TrainingFailure(f"{what} gives logits of shape {got_batch.shape} / {got_single.shape}, "
                              f"PyTorch {expected.shape}")
    difference = float(max(np.abs(got_batch - expected).max(), np.abs(got_single - expected[:1]).max()))
    tolerance = TOLERANCE * max(1.0, float(np.abs(expected).max()))
    if not difference <= tolerance:  # also catches NaN
        raise TrainingFailure(f"{what} does not reproduce the PyTorch model: max abs difference {difference:.3g} "
                              f"on {len(images)} evaluation images exceeds {tolerance:.3g}")
    return difference, tolerance


def _save_state_dict(network: torch.nn.Module, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(cpu_state_dict(network), buffer)
    atomic.write_bytes(path, buffer.getvalue())


def write_model_dir(model_dir: Path, network: torch.nn.Module, manifest: Manifest, check_images: torch.Tensor,
                    *, backbone_frozen: bool) -> dict[str, float]:
    """model.pth, the verified model.onnx (and backbone.onnx with head.onnx when ``backbone_frozen``), then
    kennel.json; returns the parity figures (also in the manifest)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    network = serving_copy(network)
    _save_state_dict(network, model_dir / kennel_artifact.WEIGHTS_FILE)
    input_size = manifest.preprocessing.input_size
    images = check_images.numpy().astype(np.float32)
    with torch.inference_mode():
        expected = network(check_images).numpy()
    split_files = (BACKBONE_FILE, HEAD_FILE)
    staged = {name: model_dir / f".{Path(name).stem}.{os.getpid()}.onnx" for name in (ONNX_FILE, *split_files)}
    try:
        export_onnx(network, staged[ONNX_FILE], input_size)
        whole = _session(staged[ONNX_FILE])
        difference, tolerance = check_parity("the ONNX export", lambda x: whole.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0],
                                             images, expected)
        parity = {"onnx_max_abs_diff": difference, "onnx_tolerance": tolerance, "onnx_check_images": len(images)}
        if backbone_frozen:
            graphs = split_onnx(staged[ONNX_FILE], head_features(network))
            backbone, head = (_session(graph) for graph in graphs)
            parity["split_onnx_max_abs_diff"], _ = check_parity(
                f"the split export ({BACKBONE_FILE} then {HEAD_FILE})",
                lambda x: head.run([ONNX_OUTPUT], {FEATURES: backbone.run([FEATURES], {ONNX_INPUT: x})[0]})[0],
                images, expected)
            for name, graph in zip(split_files, graphs):
                staged[name].write_bytes(graph)
        for name, path in staged.items():
            if path.exists():
                os.replace(path, model_dir / name)
            elif name in split_files:  # an earlier run's split must not outlive a model that has none
                (model_dir / name).unlink(missing_ok=True)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    manifest.backbone = {"sha256": backbone_identity(network.state_dict(), input_size),
                         "features": head_features(network), "onnx_sha256": None,
                         "head_onnx_sha256": None} if backbone_frozen else None
    manifest.metrics = {**manifest.metrics, **parity}
    kennel_artifact.write_manifest(model_dir, manifest)
    return parity
