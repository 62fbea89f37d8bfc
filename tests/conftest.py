"""Fixtures shared by every test folder.

generated_dataset: a small dogImages look-alike (kennel_train.sample: 3 breeds,
    small JPEGs), written once per session; treat it as read-only.
opt_ml: builds a SageMaker /opt/ml layout under tmp_path (config files as
    SageMaker writes them, the data as channels) and returns its base folder,
    for SAGEMAKER_BASE_DIR.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

from kennel_train.sample import generate

# Small images (dogImages' are ~500x375): decoding stays cheap, and the transforms
# still upscale to the model's 224x224 exactly as they would on real photos.
DATASET_IMAGE_SIZE = (96, 72)
DATASET_CLASSES = 3
DATASET_COUNTS = {"train": 6, "valid": 2, "test": 2}


@pytest.fixture(scope="session")
def generated_dataset(tmp_path_factory) -> Path:
    """train/ valid/ test/ with DATASET_CLASSES class folders each (read-only: copy it to change it)."""
    root = tmp_path_factory.mktemp("dataset") / "dogImages"
    return generate(root, classes=DATASET_CLASSES, counts=DATASET_COUNTS, seed=1, size=DATASET_IMAGE_SIZE)


@pytest.fixture
def opt_ml(tmp_path) -> Callable[..., Path]:
    """make(data, layout="training"|"separate"|None, hyperparameters={...}, copy=False, hosts=None) -> base dir.

    hyperparameters: Python values, JSON-encoded per value as SageMaker does;
    raw_hyperparameters: the file's exact string values (bad ones included).
    copy=True copies the data (a test may break it); otherwise channels are symlinks.
    """
    counter = iter(range(1000))

    def make(data: Path | None = None, layout: str | None = "training", hyperparameters: dict[str, Any] | None = None,
             raw_hyperparameters: dict[str, str] | None = None, copy: bool = False,
             hosts: list[str] | None = None) -> Path:
        base = tmp_path / f"opt_ml_{next(counter)}"
        config = base / "input" / "config"
        config.mkdir(parents=True)
        channels = base / "input" / "data"
        channels.mkdir(parents=True)
        place = (lambda src, dst: shutil.copytree(src, dst)) if copy else (lambda src, dst: dst.symlink_to(src))
        names: list[str] = []
        if data is not None and layout == "training":
            place(data, channels / "training")
            names = ["training"]
        elif data is not None and layout == "separate":
            for split in ("train", "valid", "test"):
                place(data / split, channels / split)
            names = ["train", "valid", "test"]
        encoded = {key: json.dumps(value) for key, value in (hyperparameters or {}).items()}
        encoded.update(raw_hyperparameters or {})
        (config / "hyperparameters.json").write_text(json.dumps(encoded))
        (config / "inputdataconfig.json").write_text(json.dumps(
            {name: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
                    "RecordWrapperType": "None"} for name in names}))
        hosts = hosts or ["algo-1"]
        (config / "resourceconfig.json").write_text(json.dumps(
            {"current_host": hosts[0], "hosts": hosts, "network_interface_name": "eth0"}))
        return base

    return make
