"""Each setting is written down once: the code's tables. compose.yaml and the docs are held to them."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from kennel_serve import settings as serve_settings
from kennel_train import contract

REPO = Path(__file__).resolve().parents[2]
# Set by `make train` or compose itself, read by the training image's entrypoint, not settings of a run.
TRAIN_COMPOSE_ONLY = {"KENNEL_UID", "KENNEL_GID", "KENNEL_TRAINING_DATA"}


def compose_environment(service: str) -> set[str]:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    return set(compose["services"][service]["environment"])


def test_compose_passes_every_training_setting_through():
    assert compose_environment("train") - TRAIN_COMPOSE_ONLY == {setting.env for setting in contract.SETTINGS}


def test_compose_passes_every_serving_setting_marked_for_it_through():
    assert compose_environment("serve") == {s.name for s in serve_settings.SETTINGS if s.compose}


def test_the_hyperparameters_are_exactly_the_settings_table():
    fields = [field.name for field in dataclasses.fields(contract.Hyperparameters)]
    assert fields == [setting.name for setting in contract.SETTINGS]


def test_serving_reads_no_variable_outside_its_table():
    with pytest.raises(KeyError, match="not in kennel_serve.settings.SETTINGS"):
        serve_settings._Reader({}).text("KENNEL_NOT_A_SETTING", "")


@pytest.mark.parametrize("page, table", [
    ("docs/serving.md", serve_settings.environment_table),
    ("docs/training.md", contract.hyperparameters_table),
])
def test_the_docs_show_the_tables_the_code_has(page, table):
    text = (REPO / page).read_text()
    assert table() in text, (f"{page} must hold the settings table exactly as the code makes it; print it with "
                             f"python -c 'from {table.__module__} import {table.__name__}; "
                             f"print({table.__name__}())'")
