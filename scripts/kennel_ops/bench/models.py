"""Random-weight models of the original system's shape, written as kennel model directories.

torchvision networks with the original's head (Linear(in, 128)-ReLU-Linear(128, classes)),
exported to ONNX like a trained model, with no download: what the serving
benchmark, the request budget and the tests serve. Needs torch (the dev environment).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import kennel_artifact


def class_names(count: int) -> list[str]:
    """dogImages-style folder names, sorted: '001.Breed_1' ... """
    return [f"{i:03d}.Breed_{i}" for i in range(1, count + 1)]


def build_network(architecture: str, num_classes: int):
    """torchvision network, random weights, with the original system's head; eval mode."""
    import torch
    import torchvision

    model = getattr(torchvision.models, architecture)(weights=None)
    model.fc = torch.nn.Sequential(torch.nn.Linear(model.fc.in_features, 128), torch.nn.ReLU(inplace=True),
                                   torch.nn.Linear(128, num_classes))
    return model.eval()


def write_random_model(model_dir: str | Path, architecture: str = "resnet18", num_classes: int = 5,
                       preprocessing: kennel_artifact.Preprocessing = kennel_artifact.IMAGENET_EVAL,
                       seed: int = 0, weights: bool = False, split: bool = False,
                       head_seed: int | None = None) -> Path:
    """A kennel model dir from a torchvision network with random weights (no download).

    weights=True also writes model.pth (the PyTorch state_dict) for an eager baseline.
    split=True also writes backbone.onnx and head.onnx, as training does for a frozen
    backbone (kennel_train.export): models of one ``seed`` share the backbone, and
    ``head_seed`` (default: ``seed``) draws the head's weights.
    """
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = build_network(architecture, num_classes)
    if head_seed is not None:
        torch.manual_seed(head_seed)
        for layer in model.fc.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.reset_parameters()
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    height, width = preprocessing.input_size
    example = torch.zeros(1, 3, height, width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (example,), str(model_dir / kennel_artifact.ONNX_FILE),
                          input_names=[kennel_artifact.ONNX_INPUT], output_names=[kennel_artifact.ONNX_OUTPUT],
                          dynamic_axes={kennel_artifact.ONNX_INPUT: {0: "batch"},
                                        kennel_artifact.ONNX_OUTPUT: {0: "batch"}},
                          dynamo=False)
    if weights:
        torch.save(model.state_dict(), model_dir / kennel_artifact.WEIGHTS_FILE)
    backbone = None
    if split:
        from kennel_train.export import backbone_identity, split_onnx

        graphs = split_onnx(model_dir / kennel_artifact.ONNX_FILE, model.fc[0].in_features)
        for name, graph in zip((kennel_artifact.BACKBONE_FILE, kennel_artifact.HEAD_FILE), graphs):
            (model_dir / name).write_bytes(graph)
        # The file checksums are filled in by write_manifest.
        backbone = {"sha256": backbone_identity(model.state_dict(), (height, width)),
                    "features": model.fc[0].in_features, "onnx_sha256": "", "head_onnx_sha256": ""}
    manifest = kennel_artifact.Manifest(
        architecture=architecture, class_names=class_names(num_classes), preprocessing=preprocessing,
        head={"hidden": 128}, versions={"torch": torch.__version__, "torchvision": torchvision.__version__},
        backbone=backbone)
    kennel_artifact.write_manifest(model_dir, manifest)
    return model_dir
