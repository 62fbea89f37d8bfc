"""The network: a torchvision ResNet whose ``fc`` is the classifier head.

The network is the plain torchvision module, so its state_dict loads into the
original system's definition::

    model = torchvision.models.resnet50()
    model.fc = nn.Sequential(nn.Linear(2048, 128), nn.ReLU(inplace=True), nn.Linear(128, 133))
    model.load_state_dict(torch.load("model.pth"))

:class:`SplitModel` is how training runs it: the frozen part (the whole backbone,
or everything before layer4 when fine-tuning) in eval mode without autograd,
channels_last and under autocast; only the trainable part records gradients.
In train mode with autograd on, a frozen backbone would cost time and silently
update its BatchNorm statistics.
"""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torchvision
from torch import nn

from .contract import ARCHITECTURES
from .device import Runtime
from .failure import TrainingFailure

HIDDEN_UNITS = 128  # the original head's hidden layer


def build_network(architecture: str, head: str, num_classes: int) -> torchvision.models.ResNet:
    """A randomly initialised ResNet with the requested head (seed torch first for reproducible weights)."""
    if architecture not in ARCHITECTURES:
        raise TrainingFailure(f"unknown architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}")
    network = getattr(torchvision.models, architecture)(weights=None)
    features = network.fc.in_features
    if head == "original":
        network.fc = nn.Sequential(nn.Linear(features, HIDDEN_UNITS), nn.ReLU(inplace=True),
                                   nn.Linear(HIDDEN_UNITS, num_classes))
    elif head == "linear":
        network.fc = nn.Linear(features, num_classes)
    else:
        raise TrainingFailure(f"unknown head {head!r}; valid: original, linear")
    return network


def describe_head(network: torchvision.models.ResNet, head: str) -> dict[str, Any]:
    """The manifest's ``head`` entry: what serving and the original definition need to rebuild it."""
    if head == "original":
        first, last = network.fc[0], network.fc[2]
        return {"type": "original", "in_features": first.in_features, "hidden": first.out_features,
                "num_classes": last.out_features,
                "layers": [f"Linear({first.in_features}, {first.out_features})", "ReLU(inplace=True)",
                           f"Linear({last.in_features}, {last.out_features})"]}
    return {"type": "linear", "in_features": network.fc.in_features, "num_classes": network.fc.out_features,
            "layers": [f"Linear({network.fc.in_features}, {network.fc.out_features})"]}


# --------------------------------------------------------------------------- pretrained weights


def _known_weight_files(architecture: str) -> list[tuple[str, str]]:
    """(file name, URL) of torchvision's ImageNet weights for the architecture, IMAGENET1K_V1 first."""
    weights = torchvision.models.get_model_weights(architecture)
    return [(entry.url.rsplit("/", 1)[-1], entry.url) for entry in weights]


def find_pretrained(architecture: str, channel: Path | None) -> Path:
    """The one .pth in the 'pretrained' channel, else torchvision's file in the torch hub cache."""
    if channel is not None:
        files = sorted(p for p in channel.rglob("*") if p.is_file() and p.suffix in (".pth", ".pt")
                       and not p.name.startswith("."))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise TrainingFailure(f"the 'pretrained' channel holds {len(files)} weight files "
                                  f"({', '.join(p.name for p in files[:4])}): give exactly one")
    known = _known_weight_files(architecture)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name, _ in known:
        if (cache / name).is_file():
            return cache / name
    name, url = known[0]
    where = "the 'pretrained' channel holds no .pth file; " if channel is not None else ""
    raise TrainingFailure(f"pretrained weights for {architecture} are not available offline ({where}none in {cache}): "
                          f"add a 'pretrained' channel holding the torchvision state_dict {name} ({url}), or put "
                          f"that file in {cache} (TORCH_HOME), or set pretrained=false")


def load_backbone(network: nn.Module, path: Path) -> None:
    """Load ImageNet weights into everything but the head; fail clearly when they do not fit."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, not a torch file, pickled code
        raise TrainingFailure(f"cannot load the pretrained weights {path.name}: {type(error).__name__}: "
                              f"{' '.join(str(error).split())[:200]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrainingFailure(f"the pretrained weights {path.name} are not a state_dict (a dict of tensors)")
    backbone = {key: value for key, value in state.items() if not key.startswith("fc.")}
    expected = {key: value for key, value in network.state_dict().items() if not key.startswith("fc.")}
    missing = sorted(set(expected) - set(backbone))
    unexpected = sorted(set(backbone) - set(expected))
    wrong = sorted(key for key in set(expected) & set(backbone) if expected[key].shape != backbone[key].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"missing {len(missing)} keys (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(wrong)} wrong shapes (e.g. {wrong[0]})" if wrong else "") if part)
        raise TrainingFailure(f"the pretrained weights {path.name} do not fit {type(network).__name__.lower()} "
                              f"of this architecture: {detail}; give the torchvision weights of the same architecture")
    network.load_state_dict(backbone, strict=False)


# --------------------------------------------------------------------------- training view


class OnnxFrozenPart:
    """The frozen part run by ONNX Runtime (the serving engine), on the CPU in float32.

    The frozen part never changes, so it is exported once at start (seconds) and
    every step's forward runs in ONNX Runtime, whose fused CPU kernels run a
    ResNet several times faster than PyTorch eager on CPUs without bf16
    hardware (docs/benchmarks.md); the features differ from PyTorch's by float32
    rounding only. The trainable part stays in PyTorch.
    """

    def __init__(self, frozen: nn.Sequential, input_size: tuple[int, int], threads: int):
        import onnxruntime

        module = copy.deepcopy(frozen).to("cpu", dtype=torch.float32, memory_format=torch.contiguous_format).eval()
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(module, (torch.zeros(1, 3, *input_size),), buffer, input_names=["images"],
                              output_names=["features"], opset_version=17, dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle threads sleep instead of spinning: the data loader workers need those cores between steps.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"images": batch})[0])


class SplitModel:
    """A ResNet cut in two: a frozen part run without autograd, and the part that trains.

    ``fine_tune=False``: everything up to the pooled features is frozen, only ``fc`` trains.
    ``fine_tune=True``: layer4 trains too (its BatchNorm layers in train mode).
    ``engine="onnxruntime"`` runs the frozen part in ONNX Runtime (CPU, float32 only).
    ``wrap`` may replace the trainable part by a DistributedDataParallel around it.
    """

    def __init__(self, network: torchvision.models.ResNet, fine_tune: bool, runtime: Runtime, wrap=lambda m: m,
                 engine: str = "torch", input_size: tuple[int, int] = (224, 224)):
        self.network = network.to(runtime.device, memory_format=torch.channels_last)
        self.runtime = runtime
        stem = [network.conv1, network.bn1, network.relu, network.maxpool, network.layer1, network.layer2,
                network.layer3]
        tail = [network.avgpool, nn.Flatten(1), network.fc]
        if fine_tune:
            self.frozen = nn.Sequential(*stem)
            trainable = nn.Sequential(network.layer4, *tail)
        else:
            self.frozen = nn.Sequential(*stem, network.layer4, network.avgpool, nn.Flatten(1))
            trainable = nn.Sequential(network.fc)
        for parameter in self.frozen.parameters():
            parameter.requires_grad_(False)
        self.fine_tune = fine_tune
        self.trainable = wrap(trainable)
        self._trainable_module = trainable
        self.engine = engine
        if engine == "onnxruntime":
            if runtime.is_cuda or runtime.precision != "fp32":
                raise TrainingFailure("backbone_engine=onnxruntime runs on the CPU in fp32 only: use "
                                      "mixed_precision=fp32 and device=cpu, or backbone_engine=auto")
            self.frozen.eval()
            self._frozen_forward = OnnxFrozenPart(self.frozen, input_size, runtime.threads)
        else:
            self._frozen_forward = self.frozen

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self._trainable_module.parameters() if p.requires_grad)

    def train(self) -> None:
        # BatchNorm keeps the pretrained statistics: a frozen backbone leaves training as it came,
        # the one other models trained from it share (export.backbone_identity).
        self.frozen.eval()
        self.trainable.train()

    def eval(self) -> None:
        self.frozen.eval()
        self.trainable.eval()

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        if self.engine == "onnxruntime":
            return images  # ONNX Runtime reads the batch as it is (CPU, NCHW)
        return images.to(self.runtime.device, non_blocking=True, memory_format=torch.channels_last)

    def __call__(self, images: torch.Tensor, autocast: bool = True) -> torch.Tensor:
        """Logits in float32 (call under torch.inference_mode to evaluate)."""
        with torch.no_grad(), self.runtime.autocast(autocast):
            features = self._frozen_forward(images)
        if self.fine_tune:
            with self.runtime.autocast(autocast):
                return self.trainable(features).float()
        # Only the head trains: it is tiny, so it runs in float32 and its updates stay exact.
        return self.trainable(features.float())
