"""The model artifact: the one definition that training writes and serving reads.

A model directory (SageMaker's /opt/ml/model, packed as model.tar.gz) holds:

    kennel.json   the manifest below: class names, preprocessing, metadata
    model.onnx    the serving export: input  "images" float32 [N, 3, H, W]
                                     output "logits" float32 [N, len(class_names)]
    model.pth     the PyTorch state_dict (torchvision ResNet + head), for
                  fine-tuning and for the original system's model definition
    model.int8.onnx  optional: model.onnx statically quantized to INT8 (same input
                  and output), present only when it passed the accuracy gate;
                  the manifest's ``int8`` record says why it is there or not
    backbone.onnx model.onnx up to the pooled features: input "images" as above,
                  output "features" float32 [N, F]; with head.onnx, present
                  only for a model trained with its backbone frozen (the
                  manifest's ``backbone`` record)
    head.onnx     the rest: input "features" float32 [N, F], output "logits"
                  float32 [N, len(class_names)]; backbone then head computes
                  what model.onnx computes

Models whose ``backbone`` records the same ``sha256`` share one backbone: a
multi-model endpoint keeps one backbone.onnx resident and loads only each
model's head.onnx (load_split).

Serving needs neither torch nor torchvision: this module depends on the
standard library, numpy and Pillow only, and both images import it.

Preprocessing is described by data (Preprocessing) and implemented once
(Preprocessing.apply): training evaluates with exactly this function, so what
the endpoint computes for an image is what validation and test measured.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

FORMAT_VERSION = 1
MANIFEST_FILE = "kennel.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
WEIGHTS_FILE = "model.pth"
BACKBONE_FILE = "backbone.onnx"
HEAD_FILE = "head.onnx"
ONNX_INPUT = "images"
ONNX_OUTPUT = "logits"
FEATURES = "features"  # backbone.onnx's output and head.onnx's input
BACKBONE_KEYS = ("sha256", "features", "onnx_sha256", "head_onnx_sha256")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MIB = 1024 * 1024
# A 40-megapixel photo is far beyond any camera image a client should send to a
# 224x224 classifier; anything larger is refused from its header, before decoding.
DEFAULT_MAX_PIXELS = 40_000_000
# What decoding one image may allocate: the decoded pixels plus their RGB copy, judged
# from the header before any pixel is decoded. A 40-megapixel RGB photo needs 153 MiB
# and a 40-megapixel grey, palette or 1-bit one 191 MiB (the RGB copy is made
# alongside); modes of 4 bytes a pixel (CMYK, RGBA, 32-bit) fit at 25 megapixels.
DEFAULT_MAX_DECODE_BYTES = 192 * MIB
# The shorter-side resize makes a W x 1 image 256W x 256: a header of 100 bytes would
# ask for gigabytes. No photo is near this (a 10:1 panorama resizes to 0.7 megapixels).
MAX_RESIZED_PIXELS = 16 * MIB
# Only these formats are decoded (Pillow plugin ids; JPEG covers MPO, the multi-picture
# JPEG of phone cameras). Every other plugin stays unreachable: several decode in full
# inside Image.open (an ICO's embedded PNG), before any size check could run.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
SUPPORTED_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
# Image.open inflates a PNG's compressed text chunks, up to 64 MiB of them by default.
PngImagePlugin.MAX_TEXT_MEMORY = 4 * MIB

_INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                   "nearest": Image.Resampling.NEAREST}


class ArtifactError(ValueError):
    """The model directory is missing a file or its manifest is invalid."""


class ImageError(ValueError):
    """Bytes that cannot be used as an image (not an image, truncated, too large)."""


class UnsupportedImageFormat(ImageError):
    """The bytes are not an image in one of SUPPORTED_FORMATS."""


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing: RGB -> resize -> optional centre crop -> [0,1] -> normalise.

    resize: [height, width] squashes to exactly that size (the original system's
    Resize((224, 224))); a single int resizes the shorter side keeping the aspect
    ratio (torchvision's Resize(256)).
    """

    resize: int | tuple[int, int]
    center_crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        resize = self.resize
        if isinstance(resize, list):
            object.__setattr__(self, "resize", tuple(resize))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        sizes = self.resize if isinstance(self.resize, tuple) else (self.resize,)
        if not (1 <= len(sizes) <= 2 and all(isinstance(s, int) and s > 0 for s in sizes)):
            raise ArtifactError(f"preprocessing.resize must be a positive int or [height, width], got {self.resize!r}")
        if self.center_crop is not None and not (isinstance(self.center_crop, int) and self.center_crop > 0):
            raise ArtifactError(f"preprocessing.center_crop must be a positive int or null, got {self.center_crop!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ArtifactError("preprocessing.mean and .std must hold 3 values, std all positive")
        if self.interpolation not in _INTERPOLATIONS:
            raise ArtifactError(f"preprocessing.interpolation must be one of {sorted(_INTERPOLATIONS)}")

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the tensor the model receives."""
        if self.center_crop is not None:
            return (self.center_crop, self.center_crop)
        if isinstance(self.resize, tuple):
            return self.resize  # type: ignore[return-value]
        raise ArtifactError("a shorter-side resize needs a center_crop to give a fixed input size")

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, as torchvision computes it."""
        if isinstance(self.resize, tuple):
            return (self.resize[1], self.resize[0])
        short, long_ = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long_ / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def check_size(self, width: int, height: int) -> None:
        """ImageError unless an image of this size can be preprocessed within the bounds:
        called with a header's size, before any pixel is decoded."""
        new_width, new_height = self.resized_size(width, height)
        if new_width * new_height > MAX_RESIZED_PIXELS:
            raise ImageError(f"image of {width}x{height} has too extreme an aspect ratio: resizing it for the "
                             f"model would make {new_width}x{new_height} pixels, more than the limit of "
                             f"{MAX_RESIZED_PIXELS}")
        if self.center_crop is not None and min(new_width, new_height) < self.center_crop:
            raise ImageError(f"image of {width}x{height} is smaller than the {self.center_crop}x{self.center_crop} crop")

    def apply(self, image: Image.Image) -> np.ndarray:
        """One image -> float32 array [3, H, W], ready for the model."""
        self.check_size(*image.size)
        if image.mode != "RGB":  # convert() copies even when the mode is already right
            image = image.convert("RGB")
        size = self.resized_size(*image.size)
        if size != image.size:
            image = image.resize(size, _INTERPOLATIONS[self.interpolation])
        if self.center_crop is not None:
            crop = self.center_crop
            width, height = image.size
            # torchvision's center_crop rounding, so crops agree pixel for pixel.
            top = int(round((height - crop) / 2.0))
            left = int(round((width - crop) / 2.0))
            if top < 0 or left < 0:
                raise ImageError(f"image of {width}x{height} is smaller than the {crop}x{crop} crop")
            image = image.crop((left, top, left + crop, top + crop))
        array = np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        array = (array - mean) / std
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(self.resize, tuple):
            data["resize"] = list(self.resize)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Preprocessing":
        try:
            return cls(**data)
        except TypeError as exc:
            raise ArtifactError(f"invalid preprocessing: {exc}") from None


# New models: ImageNet normalisation with a resize-and-crop, as the backbone was trained.
IMAGENET_EVAL = Preprocessing(resize=256, center_crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
# The original system's evaluation transform: Resize((224, 224)) squash, ToTensor, no normalisation.
ORIGINAL_EVAL = Preprocessing(resize=(224, 224), center_crop=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@dataclass
class Manifest:
    """Everything about a model except its weights. Stored as kennel.json."""

    architecture: str
    class_names: list[str]
    preprocessing: Preprocessing
    head: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    onnx_sha256: str | None = None
    # The INT8 decision: {"shipped", "reason", "fp32_top1", "int8_top1", "agreement",
    # "calibration_images", "seconds", ...}; None for a model made before INT8 existed.
    int8: dict[str, Any] | None = None
    int8_sha256: str | None = None  # set only when INT8_FILE ships: serving uses no other
    # The shared backbone, for a model trained with it frozen (else None): {"sha256": the
    # identity (a hash of the backbone's weights and the input size: equal means one
    # backbone.onnx serves both models), "features": F, "onnx_sha256": backbone.onnx's
    # checksum, "head_onnx_sha256": head.onnx's}.
    backbone: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ArtifactError("class_names must be a non-empty list of distinct names")
        if list(self.class_names) != sorted(self.class_names):
            # ImageFolder order: index i is the i-th folder name in sorted order.
            raise ArtifactError("class_names must be in sorted (ImageFolder) order")
        if self.format_version != FORMAT_VERSION:
            raise ArtifactError(f"artifact format {self.format_version} is not supported "
                                f"(this image reads format {FORMAT_VERSION})")
        if self.backbone is not None:
            record = self.backbone
            if not isinstance(record, dict) or sorted(record) != sorted(BACKBONE_KEYS):
                raise ArtifactError(f"backbone must be null or an object with exactly the keys "
                                    f"{', '.join(BACKBONE_KEYS)}, got {record!r}")
            if not (isinstance(record["sha256"], str) and record["sha256"]):
                raise ArtifactError("backbone.sha256 must be a non-empty string")
            features = record["features"]
            if not (isinstance(features, int) and not isinstance(features, bool) and features > 0):
                raise ArtifactError(f"backbone.features must be a positive int, got {features!r}")
            if not all(record[key] is None or isinstance(record[key], str)
                       for key in ("onnx_sha256", "head_onnx_sha256")):
                raise ArtifactError("backbone.onnx_sha256 and backbone.head_onnx_sha256 must be strings")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_int8(self) -> bool:
        return self.int8_sha256 is not None

    @property
    def shares_backbone(self) -> bool:
        """backbone.onnx and head.onnx ship: the model can share a resident backbone."""
        return self.backbone is not None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["preprocessing"] = self.preprocessing.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        if not isinstance(data, dict):
            raise ArtifactError(f"{MANIFEST_FILE} must hold a JSON object")
        for required in ("architecture", "class_names", "preprocessing"):
            if required not in data:
                raise ArtifactError(f"{MANIFEST_FILE} lacks the field {required!r}")
        data = dict(data, preprocessing=Preprocessing.from_json(data["preprocessing"]))
        try:
            return cls(**data)
        except TypeError as exc:
            raise ArtifactError(f"{MANIFEST_FILE} is invalid: {exc}") from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(model_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write kennel.json atomically (a reader never sees half a manifest)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = model_dir / ONNX_FILE
    if onnx_path.exists():
        manifest.onnx_sha256 = sha256_file(onnx_path)
    int8_path = model_dir / INT8_FILE
    manifest.int8_sha256 = sha256_file(int8_path) if int8_path.exists() else None
    if manifest.backbone is not None:
        for key, name in (("onnx_sha256", BACKBONE_FILE), ("head_onnx_sha256", HEAD_FILE)):
            if (model_dir / name).exists():
                manifest.backbone[key] = sha256_file(model_dir / name)
    target = model_dir / MANIFEST_FILE
    with tempfile.NamedTemporaryFile("w", dir=model_dir, prefix=".kennel.", delete=False) as tmp:
        json.dump(manifest.to_json(), tmp, indent=2, sort_keys=True)
        tmp.write("\n")
    # NamedTemporaryFile creates 0600: the serving image reads the model as another user.
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, target)
    return target


def read_manifest(model_dir: str | os.PathLike[str]) -> Manifest:
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} not found: not a kennel model directory "
                            f"(convert an original model.pth with the training image's 'convert' command)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    return Manifest.from_json(data)


def load(model_dir: str | os.PathLike[str], verify_checksum: bool = True) -> Manifest:
    """Read and validate a model directory for serving; raise ArtifactError with the reason."""
    manifest = read_manifest(model_dir)
    onnx_path = Path(model_dir) / ONNX_FILE
    if not onnx_path.is_file():
        raise ArtifactError(f"{onnx_path} not found")
    if verify_checksum and manifest.onnx_sha256 and sha256_file(onnx_path) != manifest.onnx_sha256:
        raise ArtifactError(f"{onnx_path} does not match the checksum in {MANIFEST_FILE} (corrupt or replaced)")
    if manifest.has_int8:
        int8_path = Path(model_dir) / INT8_FILE
        if not int8_path.is_file():
            raise ArtifactError(f"{int8_path} not found, but {MANIFEST_FILE} records it: the model directory is "
                                f"incomplete")
        if verify_checksum and sha256_file(int8_path) != manifest.int8_sha256:
            raise ArtifactError(f"{int8_path} does not match the checksum in {MANIFEST_FILE} (corrupt or replaced)")
    return manifest


def load_split(model_dir: str | os.PathLike[str], verify_backbone: bool = True) -> Manifest:
    """Read and validate a model directory for a multi-model endpoint: its backbone.onnx and head.onnx.

    head.onnx's checksum is always verified; backbone.onnx's (the bulk of the model)
    only with ``verify_backbone``: an endpoint that already holds a backbone of this
    identity does not load this one. Raises ArtifactError with the reason.
    """
    manifest = read_manifest(model_dir)
    record = manifest.backbone
    if record is None:
        raise ArtifactError(f"{Path(model_dir) / MANIFEST_FILE} records no shared backbone: the model was trained "
                            f"with freeze_backbone=false or before {BACKBONE_FILE} existed; serve it on its own "
                            f"({ONNX_FILE})")
    paths = {name: Path(model_dir) / name for name in (BACKBONE_FILE, HEAD_FILE)}
    for path in paths.values():
        if not path.is_file():
            raise ArtifactError(f"{path} not found, but {MANIFEST_FILE} records a shared backbone: the model "
                                f"directory is incomplete")
    checks = [(paths[HEAD_FILE], record["head_onnx_sha256"])]
    if verify_backbone:
        checks.append((paths[BACKBONE_FILE], record["onnx_sha256"]))
    for path, expected in checks:
        if sha256_file(path) != expected:
            raise ArtifactError(f"{path} does not match the checksum in {MANIFEST_FILE} (corrupt or replaced)")
    return manifest


def decoded_bytes(mode: str, width: int, height: int) -> int:
    """What decoding an image of this mode and size allocates, its RGB copy included.

    Pillow keeps 1-bit, grey and palette pixels in 1 byte, 16-bit grey in 2, and
    every other mode in 4 (RGB too: RGBX); converting to RGB adds 4 bytes a pixel.
    """
    stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return width * height * (stored + (0 if mode == "RGB" else 4))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
                 check_size: Callable[[int, int], None] | None = None) -> Image.Image:
    """Bytes -> a fully decoded RGB image (the first frame), or ImageError with a client-readable reason.

    Everything is judged from the header before any pixel is decoded: the format
    (SUPPORTED_FORMATS only), the pixel count, what decoding allocates, and
    check_size(width, height) (the caller's own bounds, e.g. Preprocessing.check_size).
    Any failure of the decoders on these bytes is the bytes' fault: an ImageError.
    """
    if not data:
        raise ImageError("empty image")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError:
        # Pillow's own guard fired first (far beyond its MAX_IMAGE_PIXELS).
        raise ImageError(f"image exceeds the limit of {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise UnsupportedImageFormat(f"the bytes are not an image in a supported format ({SUPPORTED_FORMAT_NAMES})") from None
    except Exception:  # noqa: BLE001 - a plugin's header parser fails in its own ways on crafted bytes
        raise ImageError("the image header is corrupt") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError("image has no pixels")
    if width * height > max_pixels:
        raise ImageError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
    needed = decoded_bytes(image.mode, width, height)
    if needed > max_bytes:
        raise ImageError(f"image of {width}x{height} pixels in mode {image.mode} needs {needed // MIB} MiB to "
                         f"decode, more than the limit of {max_bytes // MIB} MiB")
    if check_size is not None:
        check_size(width, height)
    try:
        image.load()
        if image.mode == "RGB":  # convert() would copy it
            return image
        # RGBA, LA, P (with or without transparency), L, I;16, CMYK -> RGB. Going through
        # RGBA gives the same pixels for a palette with transparency and costs a third copy;
        # Pillow's warning that suggests it is noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return image.convert("RGB")
    except Exception:  # noqa: BLE001 - decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        raise ImageError("the image data is truncated or corrupt") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(logits: Sequence[float], class_names: Sequence[str], k: int) -> list[dict[str, Any]]:
    """[{"index", "breed", "probability"}] for the k most likely classes."""
    probs = softmax(np.asarray(logits, dtype=np.float64))
    order = np.argsort(-probs, kind="stable")[: max(1, min(k, len(class_names)))]
    return [{"index": int(i), "breed": breed_name(class_names[i]), "class_name": class_names[i],
             "probability": float(probs[i])} for i in order]


def breed_name(class_name: str) -> str:
    """'001.Affenpinscher' -> 'Affenpinscher'; 'German_shepherd_dog' -> 'German shepherd dog'."""
    head, _, tail = class_name.partition(".")
    name = tail if tail and head.isdigit() else class_name
    return name.replace("_", " ")

