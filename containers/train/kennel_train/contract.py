"""The SageMaker training contract: where things are, which settings apply, where the data is.

Paths are rooted at SAGEMAKER_BASE_DIR (default /opt/ml), as the toolkit roots them.

Settings come from four places; a later one wins:

    1. defaults (SETTINGS below)
    2. environment variables KENNEL_<NAME> (KENNEL_EPOCHS=3): compose users, images
    3. /opt/ml/input/config/hyperparameters.json: SageMaker jobs and tuning jobs
    4. command-line flags --<name> (--epochs 3): ``python -m kennel_train``

hyperparameters.json holds JSON-encoded strings ("3", "0.001", "true",
"\\"resnet50\\""); a value that is not JSON is taken as the plain string, as the
toolkit does. Keys starting with ``sagemaker_`` are the platform's and ignored;
any other unknown key fails the job, naming the valid ones (a typo must not
silently train with a default).

Data: either ONE channel ``training`` holding train/ valid/ test/ (the original
system's layout), or three channels ``train``, ``valid`` and ``test``, each
holding one folder per class.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import kennel_env

from . import quantize
from .failure import TrainingFailure

BASE_DIR_ENV = "SAGEMAKER_BASE_DIR"
ENV_PREFIX = "KENNEL_"
SPLITS = ("train", "valid", "test")
TRAINING_CHANNEL = "training"
PRETRAINED_CHANNEL = "pretrained"

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
HEADS = ("original", "linear")
OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
BACKBONE_ENGINES = ("auto", "torch", "onnxruntime")


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class Paths:
    """The /opt/ml layout (see the SageMaker developer guide)."""

    base: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Paths":
        environ = os.environ if environ is None else environ
        return cls(Path(environ.get(BASE_DIR_ENV) or "/opt/ml"))

    @property
    def config(self) -> Path:
        return self.base / "input" / "config"

    @property
    def hyperparameters(self) -> Path:
        return self.config / "hyperparameters.json"

    @property
    def input_data_config(self) -> Path:
        return self.config / "inputdataconfig.json"

    @property
    def resource_config(self) -> Path:
        return self.config / "resourceconfig.json"

    @property
    def data(self) -> Path:
        return self.base / "input" / "data"

    @property
    def model(self) -> Path:
        return self.base / "model"

    @property
    def output(self) -> Path:
        return self.base / "output"

    @property
    def output_data(self) -> Path:
        return self.output / "data"

    @property
    def failure(self) -> Path:
        return self.output / "failure"

    @property
    def tensorboard(self) -> Path:
        return self.output / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.base / "checkpoints"


# --------------------------------------------------------------------------- settings


class _Invalid(ValueError):
    """A value that does not fit a setting; the message says what would."""


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # tuning jobs may send "3.0" for an integer range
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _Invalid(f"expected an integer from {low} to {high}")
        return value
    return parse


def _real(low: float, high: float, low_open: bool = False) -> Callable[[Any], float]:
    expected = f"expected a number above {low} up to {high}" if low_open else f"expected a number from {low} to {high}"

    def parse(value: Any) -> float:
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(expected)
        value = float(value)
        if not (low < value <= high if low_open else low <= value <= high):  # also refuses NaN
            raise _Invalid(expected)
        return value
    return parse


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _boolean(value: Any) -> bool:
    try:
        return kennel_env.parse_bool(value)
    except ValueError as error:
        raise _Invalid(str(error)) from None


def _choice(choices: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        raise _Invalid(f"expected one of {', '.join(choices)}")
    return parse


def _workers(value: Any) -> int | None:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        return _integer(0, 64)(value)
    except _Invalid:
        raise _Invalid("expected auto or an integer from 0 to 64") from None


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("architecture", "resnet50", _choice(ARCHITECTURES),
            ", ".join(f"`{name}`" for name in ARCHITECTURES) + " (torchvision)"),
    Setting("head", "original", _choice(HEADS),
            "`original`: Linear(features, 128), ReLU, Linear(128, classes); `linear`: one Linear"),
    Setting("freeze_backbone", True, _boolean,
            "`true`: train the head only (the original); `false`: also fine-tune the last stage (layer4)"),
    Setting("pretrained", True, _boolean,
            "ImageNet weights from the `pretrained` channel or the torch hub cache; never downloaded"),
    Setting("epochs", 5, _integer(1, 10_000), "passes over the training split: 1-10000"),
    Setting("batch_size", 64, _integer(1, 4096), "images per step: 1-4096 (the original tuned 32-512)"),
    Setting("learning_rate", 0.001, _real(0.0, 10.0, low_open=True),
            "optimizer step size: above 0, up to 10 (the original tuned 0.001-0.1)"),
    Setting("optimizer", "adam", _choice(OPTIMIZERS), "`adam` (the original), `adamw`, `sgd`"),
    Setting("momentum", 0.9, _real(0.0, 1.0), "SGD momentum: 0-1, `sgd` only"),
    Setting("weight_decay", 0.0, _real(0.0, 1.0), "L2 penalty (decoupled for `adamw`): 0-1"),
    Setting("seed", 0, _integer(0, 2**32 - 1), "seed for weights, shuffling and augmentation"),
    Setting("workers", None, _workers,
            "data loader processes decoding images: `auto` (one per usable CPU, at most 8) or a count"),
    Setting("mixed_precision", "auto", _choice(PRECISIONS),
            "`fp32`, `bf16`, `fp16` (CUDA only); `auto`: bf16 on GPUs that have it else fp16, bf16 on CPUs "
            "with bf16 hardware (AVX512-BF16, AMX), else fp32"),
    Setting("device", "auto", _choice(DEVICES), "`cpu`, `cuda`; `auto`: CUDA when a GPU is visible"),
    Setting("backbone_engine", "auto", _choice(BACKBONE_ENGINES),
            "what runs the frozen layers: `torch`, `onnxruntime`; `auto`: ONNX Runtime on the CPU in fp32, "
            "else torch"),
    Setting("progress_interval", 20, _integer(1, 1_000_000), "steps between progress lines"),
    Setting("max_unreadable_fraction", 0.01, _real(0.0, 1.0),
            "unreadable images are skipped and counted; more than this fraction of a split fails the job"),
    Setting("keep_checkpoints", 2, _integer(1, 1000), "end-of-epoch checkpoints kept (older ones are deleted)"),
    Setting("int8", True, _boolean,
            f"`true`: also write `model.int8.onnx` (static INT8, calibrated on {quantize.CALIBRATION_IMAGES} "
            f"training images) when, on the validation split, its top-1 accuracy is at most "
            f"{quantize.MAX_TOP1_DROP * 100:g} points below FP32's and it agrees with FP32 on "
            f"{quantize.MIN_AGREEMENT:.0%} of the top-1 answers; `false`: FP32 only"),
)
SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


def hyperparameters_table() -> str:
    """The markdown table of SETTINGS, as the training docs show it (tests/unit/test_settings_sources.py)."""
    rows = ["| setting | environment | default | values |", "| --- | --- | --- | --- |"]
    for setting in SETTINGS:
        default = "auto" if setting.default is None else json.dumps(setting.default)
        rows.append(f"| `{setting.name}` | `{setting.env}` | `{default}` | {setting.help} |")
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class Hyperparameters:
    architecture: str
    head: str
    freeze_backbone: bool
    pretrained: bool
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float
    weight_decay: float
    seed: int
    workers: int | None
    mixed_precision: str
    device: str
    backbone_engine: str
    progress_interval: int
    max_unreadable_fraction: float
    keep_checkpoints: int
    int8: bool

    def to_json(self) -> dict[str, Any]:
        return {setting.name: getattr(self, setting.name) for setting in SETTINGS}


@dataclass(frozen=True)
class ResolvedSettings:
    hyperparameters: Hyperparameters
    sources: dict[str, str]  # setting name -> where its value came from


def decode_value(raw: Any) -> Any:
    """A hyperparameters.json / environment / flag value -> Python (JSON when it parses, else the string)."""
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _unknown(name: str, where: str) -> TrainingFailure:
    close = difflib.get_close_matches(name, SETTINGS_BY_NAME, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return TrainingFailure(f"unknown hyperparameter {name!r} in {where}{hint}; valid: "
                           f"{', '.join(SETTINGS_BY_NAME)} (and sagemaker_* keys)")


def _parse(setting: Setting, raw: Any, where: str) -> Any:
    try:
        return setting.parse(decode_value(raw))
    except _Invalid as error:
        shown = raw if isinstance(raw, str) else json.dumps(raw)
        raise TrainingFailure(f"hyperparameter {setting.name}={shown!r} ({where}) is invalid: {error}") from None


def read_hyperparameters_file(path: Path) -> dict[str, Any]:
    """hyperparameters.json as a dict (empty when the file is absent)."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise TrainingFailure(f"{path.name} is not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise TrainingFailure(f"{path.name} must hold a JSON object of strings, got {type(content).__name__}")
    return content


def resolve(paths: Paths, environ: Mapping[str, str] | None = None,
            flags: Mapping[str, str] | None = None) -> ResolvedSettings:
    """Defaults < KENNEL_* environment < hyperparameters.json < flags; every value validated."""
    environ = os.environ if environ is None else environ
    values = {setting.name: setting.default for setting in SETTINGS}
    sources = {setting.name: "default" for setting in SETTINGS}
    for setting in SETTINGS:
        if environ.get(setting.env, "").strip():
            values[setting.name] = _parse(setting, environ[setting.env], setting.env)
            sources[setting.name] = setting.env
    given = {name: raw for name, raw in read_hyperparameters_file(paths.hyperparameters).items()
             if not name.startswith("sagemaker_")}
    for name in given:  # names first: a typo is the likelier mistake, and its value may look invalid too
        if name not in SETTINGS_BY_NAME:
            raise _unknown(name, "hyperparameters.json")
    for name, raw in given.items():
        values[name] = _parse(SETTINGS_BY_NAME[name], raw, "hyperparameters.json")
        sources[name] = "hyperparameters.json"
    for name, raw in (flags or {}).items():
        if name not in SETTINGS_BY_NAME:
            raise _unknown(name, "the command line")
        values[name] = _parse(SETTINGS_BY_NAME[name], raw, SETTINGS_BY_NAME[name].flag)
        sources[name] = SETTINGS_BY_NAME[name].flag
    return ResolvedSettings(Hyperparameters(**values), sources)


# --------------------------------------------------------------------------- channels


@dataclass(frozen=True)
class DataSplits:
    """The folder of each split (each holds one folder per class) and how they were given."""

    train: Path
    valid: Path
    test: Path
    layout: str

    def items(self) -> list[tuple[str, Path]]:
        return [("train", self.train), ("valid", self.valid), ("test", self.test)]


def _channels(paths: Paths) -> dict[str, Path]:
    if not paths.data.is_dir():
        return {}
    return {entry.name: entry for entry in sorted(paths.data.iterdir())
            if entry.is_dir() and not entry.name.startswith(".")}


def _check_input_modes(paths: Paths, names: Sequence[str]) -> None:
    """Pipe mode streams records through FIFOs; this program reads image files."""
    if not paths.input_data_config.is_file():
        return
    try:
        config = json.loads(paths.input_data_config.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise TrainingFailure(f"inputdataconfig.json is not valid JSON: {error}") from None
    for name in names:
        mode = (config.get(name) or {}).get("TrainingInputMode", "File") if isinstance(config, dict) else "File"
        if mode == "Pipe":
            raise TrainingFailure(f"channel {name!r} uses Pipe input mode: this image reads image files, "
                                  "use File or FastFile mode")


def locate_splits(paths: Paths) -> DataSplits:
    """Find train/ valid/ test/ in either channel layout, or fail saying what is missing."""
    channels = _channels(paths)
    separate = [split for split in SPLITS if split in channels]
    found = ", ".join(repr(name) for name in channels) or "none"
    if TRAINING_CHANNEL in channels and separate:
        raise TrainingFailure(f"both a {TRAINING_CHANNEL!r} channel and {', '.join(map(repr, separate))} channels "
                              f"were given: use one layout, either {TRAINING_CHANNEL!r} holding train/ valid/ test/ "
                              "or the three channels 'train', 'valid', 'test'")
    if TRAINING_CHANNEL in channels:
        _check_input_modes(paths, [TRAINING_CHANNEL])
        root = channels[TRAINING_CHANNEL]
        nested = [child for child in sorted(root.iterdir()) if child.is_dir() and (child / "train").is_dir()]
        if not (root / "train").is_dir() and len(nested) == 1:
            root = nested[0]  # the archive unpacked with its top folder: dogImages/train/...
        missing = [split for split in SPLITS if not (root / split).is_dir()]
        if missing:
            raise TrainingFailure(f"the {TRAINING_CHANNEL!r} channel ({root}) has no "
                                  f"{', '.join(split + '/' for split in missing)} folder: it must hold train/ valid/ "
                                  "test/, each with one folder per class")
        return DataSplits(root / "train", root / "valid", root / "test", f"one {TRAINING_CHANNEL!r} channel")
    if separate:
        missing = [split for split in SPLITS if split not in channels]
        if missing:
            raise TrainingFailure(f"missing channel {', '.join(map(repr, missing))}: give the channels 'train', "
                                  f"'valid' and 'test' (found: {found}), or one {TRAINING_CHANNEL!r} channel "
                                  "holding train/ valid/ test/")
        _check_input_modes(paths, SPLITS)
        return DataSplits(channels["train"], channels["valid"], channels["test"], "channels 'train', 'valid', 'test'")
    raise TrainingFailure(f"missing channel {TRAINING_CHANNEL!r}: give one {TRAINING_CHANNEL!r} channel holding train/ "
                          f"valid/ test/ (the original layout), or the channels 'train', 'valid' and 'test' "
                          f"(found: {found} under {paths.data})")


def pretrained_channel(paths: Paths) -> Path | None:
    channel = paths.data / PRETRAINED_CHANNEL
    return channel if channel.is_dir() else None
