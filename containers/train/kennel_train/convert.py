"""Turn a model of the original system into a kennel model directory.

    python -m kennel_train.convert --model-tar model.tar.gz --output DIR [--class-names FILE]
    python -m kennel_train.convert --model-pth model.pth --output DIR [--class-names FILE]
        [--int8-images IMAGES]

The original training job saved ``torch.save(model.cpu().state_dict(), "model.pth")``
(ResNet-50, head Linear(2048, 128) - ReLU - Linear(128, 133)) and nothing else:
no class names, no preprocessing. This writes DIR/model.pth (the same weights),
DIR/model.onnx (verified against PyTorch), DIR/backbone.onnx and DIR/head.onnx
(the original froze the whole backbone: models converted from the same
ImageNet weights share it on a multi-model endpoint) and DIR/kennel.json with:

* the original evaluation preprocessing (ORIGINAL_EVAL: squash to 224x224, no
  normalisation), so the endpoint returns the same raw logits the original did;
* the class names: the 133 dogImages folders for a 133-class model, else the
  ``--class-names`` file (one name per line, or a JSON list), in sorted order.

With ``--int8-images`` it also builds DIR/model.int8.onnx as training does
(kennel_train.quantize: calibrated, then gated on accuracy and agreement with
FP32). IMAGES holds one folder per class named as the class names: either
train/ and valid/ (dogImages' own layout: calibration on train/, the gate on
valid/), or the class folders themselves (alternate images calibrate and gate).
Without it the model is FP32 only and the manifest says so.

Pack DIR as SageMaker's model.tar.gz with ``tar -czf model.tar.gz -C DIR .``.
Errors are one line on stderr and exit code 1.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
import tarfile
from pathlib import Path

import torch

import kennel_artifact
from kennel_artifact import ORIGINAL_EVAL, Manifest

from . import data, export, quantize
from .breeds import DOG_IMAGES_CLASSES
from .contract import ARCHITECTURES
from .failure import TrainingFailure
from .model import build_network, describe_head
from .sample import draw_image

MAX_WEIGHTS_BYTES = 2 << 30  # a ResNet-152 state_dict is ~240 MB; anything near 2 GB is not one


class ConvertError(Exception):
    """A problem with the input; the message is the one line the user sees."""


def read_weights(model_tar: Path | None, model_pth: Path | None) -> tuple[bytes, str]:
    """The bytes of the original model.pth and a name for messages."""
    if model_pth is not None:
        try:
            return model_pth.read_bytes(), model_pth.name
        except OSError as error:
            raise ConvertError(f"cannot read {model_pth}: {error.strerror or error}") from None
    assert model_tar is not None
    try:
        with tarfile.open(model_tar, "r:*") as archive:
            members = [m for m in archive.getmembers() if m.isfile() and Path(m.name).name == "model.pth"]
            if not members:
                names = ", ".join(m.name for m in archive.getmembers()[:5]) or "nothing"
                raise ConvertError(f"{model_tar.name} holds no model.pth (it holds: {names})")
            member = min(members, key=lambda m: len(Path(m.name).parts))  # the top-level one
            if member.size > MAX_WEIGHTS_BYTES:
                raise ConvertError(f"{member.name} in {model_tar.name} is {member.size} bytes: not a ResNet state_dict")
            return archive.extractfile(member).read(), f"{model_tar.name}:{member.name}"
    except FileNotFoundError:
        raise ConvertError(f"{model_tar} does not exist") from None
    except (tarfile.TarError, EOFError, OSError):
        hint = " (it looks like a model.pth: use --model-pth)" if _starts_with(model_tar, b"PK") else ""
        raise ConvertError(f"{model_tar} is not a readable .tar.gz archive{hint}") from None


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return False


def load_state_dict(raw: bytes, name: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception:
        hint = " (it looks like a .tar.gz: use --model-tar)" if raw[:2] == b"\x1f\x8b" else ""
        raise ConvertError(f"{name} is not a PyTorch state_dict saved with torch.save{hint}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{name} does not hold a state_dict (a dict of tensors)")
    return state


def head_of(state: dict[str, torch.Tensor], name: str) -> tuple[str, int]:
    """('original' | 'linear', number of classes) from the head's keys."""
    if "fc.2.weight" in state and "fc.0.weight" in state:
        return "original", int(state["fc.2.weight"].shape[0])
    if "fc.weight" in state:
        return "linear", int(state["fc.weight"].shape[0])
    raise ConvertError(f"{name} has no classifier head fc.0/fc.2 (the original) or fc: not a ResNet of the "
                       "original system")


def check_keys(network: torch.nn.Module, state: dict[str, torch.Tensor], name: str, architecture: str) -> None:
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            key = wrong[0]
            parts.append(f"{len(wrong)} wrong shapes (e.g. {key}: {tuple(state[key].shape)}, "
                         f"expected {tuple(expected[key].shape)})")
        raise ConvertError(f"{name} does not fit {architecture} with the original head: {'; '.join(parts)} "
                           "(another architecture? try --architecture)")


def read_class_names(path: Path | None, num_classes: int) -> list[str]:
    if path is None:
        if num_classes != len(DOG_IMAGES_CLASSES):
            raise ConvertError(f"the model has {num_classes} classes, not dogImages' {len(DOG_IMAGES_CLASSES)}: "
                               "give --class-names FILE (one name per line, in sorted folder order)")
        return list(DOG_IMAGES_CLASSES)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConvertError(f"cannot read {path}: {error}") from None
    try:
        names = json.loads(text)
    except ValueError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConvertError(f"{path} must hold class names, one per line or a JSON list of strings")
    if len(names) != num_classes:
        raise ConvertError(f"{path} lists {len(names)} class names, the model has {num_classes} classes")
    if names != sorted(names) or len(set(names)) != len(names):
        raise ConvertError(f"{path}: class names must be distinct and in sorted order (the ImageFolder order "
                           "the model was trained with)")
    return names


def check_images(count: int = 8) -> torch.Tensor:
    """Dog-photo-sized generated images through the original preprocessing, for the ONNX check."""
    rng = random.Random("convert")
    return torch.stack([torch.from_numpy(ORIGINAL_EVAL.apply(draw_image(i, rng))) for i in range(count)])


def int8_images(folder: Path, class_names: list[str]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(calibration, validation) samples of ``folder``, labelled by the model's class names."""
    if not folder.is_dir():
        raise ConvertError(f"--int8-images {folder} is not a folder")
    if (folder / "train").is_dir() and (folder / "valid").is_dir():
        calibration = data.index_split("train", folder / "train", class_names).samples
        validation = data.index_split("valid", folder / "valid", class_names).samples
    else:
        every = data.index_split("images", folder, class_names).samples
        calibration, validation = every[0::2], every[1::2]
    if not calibration or not validation:
        raise ConvertError(f"--int8-images {folder} holds no images in folders named as the model's classes "
                           f"(e.g. {class_names[0]}/), for calibration and for the accuracy gate")
    return calibration, validation


def convert(model_tar: Path | None, model_pth: Path | None, output: Path, class_names: Path | None,
            architecture: str = "resnet50", images: Path | None = None) -> Manifest:
    raw, name = read_weights(model_tar, model_pth)
    state = load_state_dict(raw, name)
    head, num_classes = head_of(state, name)
    names = read_class_names(class_names, num_classes)
    network = build_network(architecture, head, num_classes)
    check_keys(network, state, name, architecture)
    network.load_state_dict(state)
    manifest = Manifest(architecture=architecture, class_names=names, preprocessing=ORIGINAL_EVAL,
                        head=describe_head(network, head),
                        data={"converted_from": name, "model_pth_sha256": hashlib.sha256(raw).hexdigest()},
                        versions={"torch": torch.__version__.split("+")[0],
                                  "kennel_artifact_format": str(kennel_artifact.FORMAT_VERSION)})
    samples = int8_images(images, names) if images is not None else None
    try:
        # The original system trained the head only: its backbone is shareable.
        export.write_model_dir(output, network, manifest, check_images(), backbone_frozen=True)
        if samples is None:
            quantize.skip(output, manifest, "no images were given to calibrate and check it (--int8-images)")
        else:
            quantize.build_int8(output, manifest, *samples)
    except TrainingFailure as error:
        raise ConvertError(str(error)) from None
    except OSError as error:
        raise ConvertError(f"cannot write {output}: {error.strerror or error}") from None
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kennel_train.convert",
                                     description="Convert an original system model.pth into a kennel model directory.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-tar", type=Path, help="the original job's model.tar.gz (holding model.pth)")
    source.add_argument("--model-pth", type=Path, help="the original model.pth state_dict")
    parser.add_argument("--output", type=Path, required=True, help="model directory to write")
    parser.add_argument("--class-names", type=Path,
                        help="class names, one per line or a JSON list (default: the 133 dogImages breeds)")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="resnet50",
                        help="the network the weights belong to (default: resnet50, the original)")
    parser.add_argument("--int8-images", type=Path, metavar="IMAGES",
                        help="class folders (or train/ and valid/ of them) to build and check model.int8.onnx with; "
                             "without it the model is FP32 only")
    args = parser.parse_args(argv)
    try:
        manifest = convert(args.model_tar, args.model_pth, args.output, args.class_names, args.architecture,
                           args.int8_images)
    except ConvertError as error:
        print(f"convert: error: {error}", file=sys.stderr)
        return 1
    print(f"converted to {args.output}: {manifest.architecture}, {manifest.num_classes} classes, original "
          f"preprocessing, ONNX max abs difference {manifest.metrics['onnx_max_abs_diff']:.2g}; "
          f"{quantize.describe(manifest.int8)}; pack it with: "
          f"tar -czf model.tar.gz -C {args.output} .")
    return 0


if __name__ == "__main__":
    sys.exit(main())
