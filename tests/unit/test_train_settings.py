"""kennel_train.contract: hyperparameters from SageMaker's file, the environment and flags; channel layouts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kennel_train import contract
from kennel_train.contract import Paths, locate_splits, resolve
from kennel_train.failure import TrainingFailure


def paths_with(tmp_path: Path, hyperparameters: dict[str, str] | None = None) -> Paths:
    paths = Paths(tmp_path)
    paths.config.mkdir(parents=True)
    if hyperparameters is not None:
        paths.hyperparameters.write_text(json.dumps(hyperparameters))
    return paths


def test_string_values_as_sagemaker_writes_them(tmp_path):
    paths = paths_with(tmp_path, {"architecture": '"resnet18"', "epochs": "3", "learning_rate": "0.05",
                                  "freeze_backbone": "false", "workers": '"auto"', "mixed_precision": '"bf16"',
                                  "head": '"linear"', "optimizer": '"sgd"', "pretrained": "true"})
    hp = resolve(paths, environ={}).hyperparameters
    assert (hp.architecture, hp.epochs, hp.learning_rate, hp.freeze_backbone, hp.workers) == \
        ("resnet18", 3, 0.05, False, None)
    assert (hp.mixed_precision, hp.head, hp.optimizer, hp.pretrained) == ("bf16", "linear", "sgd", True)


def test_plain_strings_and_loose_forms_are_accepted(tmp_path):
    # Hand-written files (boto3, the console) often skip the inner quotes; tuning may send "8.0" for an integer.
    paths = paths_with(tmp_path, {"architecture": "ResNet34", "batch_size": "8.0", "freeze_backbone": "False",
                                  "workers": "2", "optimizer": "AdamW"})
    hp = resolve(paths, environ={}).hyperparameters
    assert (hp.architecture, hp.batch_size, hp.freeze_backbone, hp.workers, hp.optimizer) == \
        ("resnet34", 8, False, 2, "adamw")


@pytest.mark.parametrize("learning_rate", ["0.001", "0.1", "0.0316"])
@pytest.mark.parametrize("batch_size", ["32", "512", "181"])
def test_the_original_tuning_ranges_are_accepted(tmp_path, learning_rate, batch_size):
    hp = resolve(paths_with(tmp_path, {"learning_rate": learning_rate, "batch_size": batch_size}), environ={})
    assert hp.hyperparameters.learning_rate == float(learning_rate)
    assert hp.hyperparameters.batch_size == int(batch_size)


def test_defaults_are_the_original_setting(tmp_path):
    resolved = resolve(paths_with(tmp_path), environ={})
    hp = resolved.hyperparameters
    assert (hp.architecture, hp.head, hp.freeze_backbone, hp.pretrained, hp.optimizer) == \
        ("resnet50", "original", True, True, "adam")
    assert set(resolved.sources.values()) == {"default"}


BAD_VALUES = [
    ("architecture", '"resnet51"', "expected one of resnet18, resnet34, resnet50, resnet101, resnet152"),
    ("architecture", "3", "expected one of"),
    ("head", '"mlp"', "expected one of original, linear"),
    ("freeze_backbone", '"maybe"', "expected true or false"),
    ("pretrained", "2", "expected true or false"),
    ("epochs", "0", "expected an integer from 1 to 10000"),
    ("epochs", "2.5", "expected an integer from 1 to 10000"),
    ("epochs", '"many"', "expected an integer"),
    ("epochs", "true", "expected an integer"),
    ("batch_size", "-32", "expected an integer from 1 to 4096"),
    ("batch_size", "100000", "expected an integer from 1 to 4096"),
    ("learning_rate", "0", "expected a number above 0.0 up to 10.0"),
    ("learning_rate", "-0.1", "expected a number above 0.0"),
    ("learning_rate", '"fast"', "expected a number"),
    ("learning_rate", "NaN", "expected a number"),
    ("optimizer", '"rmsprop"', "expected one of adam, adamw, sgd"),
    ("momentum", "1.5", "expected a number from 0.0 to 1.0"),
    ("weight_decay", "-1", "expected a number from 0.0 to 1.0"),
    ("seed", "-1", "expected an integer from 0 to 4294967295"),
    ("workers", "-1", "expected auto or an integer from 0 to 64"),
    ("workers", '"many"', "expected auto or an integer"),
    ("mixed_precision", '"fp8"', "expected one of auto, fp32, bf16, fp16"),
    ("device", '"tpu"', "expected one of auto, cpu, cuda"),
    ("backbone_engine", '"tensorrt"', "expected one of auto, torch, onnxruntime"),
    ("progress_interval", "0", "expected an integer from 1"),
    ("max_unreadable_fraction", "1.5", "expected a number from 0.0 to 1.0"),
    ("keep_checkpoints", "0", "expected an integer from 1 to 1000"),
    ("int8", "\"sometimes\"", "expected true or false"),
    ("epochs", "[3]", "expected an integer"),
]


def test_every_setting_has_a_bad_value_case():
    assert {name for name, _, _ in BAD_VALUES} == set(contract.SETTINGS_BY_NAME)


@pytest.mark.parametrize(("name", "raw", "expected"), BAD_VALUES)
def test_a_bad_value_names_the_setting_the_value_and_what_fits(tmp_path, name, raw, expected):
    with pytest.raises(TrainingFailure) as caught:
        resolve(paths_with(tmp_path, {name: raw}), environ={})
    message = str(caught.value)
    assert message.startswith(f"hyperparameter {name}={raw!r} (hyperparameters.json) is invalid: ")
    assert expected in message


def test_an_unknown_key_fails_naming_it_a_suggestion_and_the_valid_keys(tmp_path):
    with pytest.raises(TrainingFailure) as caught:
        resolve(paths_with(tmp_path, {"learning_rat": "0.01", "epochs": "2"}), environ={})
    message = str(caught.value)
    assert "unknown hyperparameter 'learning_rat' in hyperparameters.json (did you mean 'learning_rate'?)" in message
    assert all(name in message for name in contract.SETTINGS_BY_NAME)


def test_an_unknown_key_is_reported_before_a_bad_value(tmp_path):
    with pytest.raises(TrainingFailure, match="unknown hyperparameter 'batchsize'"):
        resolve(paths_with(tmp_path, {"epochs": "none", "batchsize": "32"}), environ={})


def test_sagemaker_keys_are_the_platforms_and_ignored(tmp_path):
    paths = paths_with(tmp_path, {"sagemaker_job_name": '"job-1"', "sagemaker_region": '"eu-west-1"',
                                  "sagemaker_program": '"x.py"', "epochs": "2"})
    assert resolve(paths, environ={}).hyperparameters.epochs == 2


def test_a_hyperparameters_file_that_is_not_a_json_object_fails_clearly(tmp_path):
    paths = paths_with(tmp_path)
    paths.hyperparameters.write_text("{epochs: 3")
    with pytest.raises(TrainingFailure, match="hyperparameters.json is not valid JSON"):
        resolve(paths, environ={})
    paths.hyperparameters.write_text('["epochs"]')
    with pytest.raises(TrainingFailure, match="must hold a JSON object of strings, got list"):
        resolve(paths, environ={})


def test_precedence_defaults_then_environment_then_file_then_flags(tmp_path):
    paths = paths_with(tmp_path, {"epochs": "3", "batch_size": "16"})
    environ = {"KENNEL_EPOCHS": "7", "KENNEL_LEARNING_RATE": "0.01", "KENNEL_BATCH_SIZE": "8",
               "KENNEL_TRAINING_DATA": "bundled-sample"}  # other KENNEL_* variables belong to the image
    resolved = resolve(paths, environ=environ, flags={"batch_size": "4"})
    hp = resolved.hyperparameters
    assert (hp.epochs, hp.learning_rate, hp.batch_size, hp.optimizer) == (3, 0.01, 4, "adam")
    assert resolved.sources["epochs"] == "hyperparameters.json"
    assert resolved.sources["learning_rate"] == "KENNEL_LEARNING_RATE"
    assert resolved.sources["batch_size"] == "--batch-size"
    assert resolved.sources["optimizer"] == "default"


def test_bad_environment_and_flag_values_name_their_source(tmp_path):
    with pytest.raises(TrainingFailure, match=r"hyperparameter epochs='x' \(KENNEL_EPOCHS\) is invalid"):
        resolve(paths_with(tmp_path), environ={"KENNEL_EPOCHS": "x"})
    with pytest.raises(TrainingFailure, match=r"hyperparameter head='big' \(--head\) is invalid"):
        resolve(paths_with(tmp_path / "b"), environ={}, flags={"head": "big"})


def test_setting_names_give_the_environment_and_flag_names():
    setting = contract.SETTINGS_BY_NAME["max_unreadable_fraction"]
    assert (setting.env, setting.flag) == ("KENNEL_MAX_UNREADABLE_FRACTION", "--max-unreadable-fraction")


def test_paths_follow_sagemaker_base_dir(tmp_path):
    paths = Paths.from_env({"SAGEMAKER_BASE_DIR": str(tmp_path)})
    assert paths.failure == tmp_path / "output" / "failure"
    assert paths.checkpoints == tmp_path / "checkpoints"
    assert paths.model == tmp_path / "model"
    assert Paths.from_env({}).base == Path("/opt/ml")


# --------------------------------------------------------------------------- channels


def make_split_folders(root: Path, splits=("train", "valid", "test")) -> None:
    for split in splits:
        (root / split / "001.Affenpinscher").mkdir(parents=True)


def test_one_training_channel_holding_the_three_splits(tmp_path):
    paths = Paths(tmp_path)
    make_split_folders(paths.data / "training")
    splits = locate_splits(paths)
    assert splits.train == paths.data / "training" / "train"
    assert splits.test == paths.data / "training" / "test"
    assert splits.layout == "one 'training' channel"


def test_the_archive_unpacked_with_its_top_folder_is_found(tmp_path):
    paths = Paths(tmp_path)
    make_split_folders(paths.data / "training" / "dogImages")
    assert locate_splits(paths).valid == paths.data / "training" / "dogImages" / "valid"


def test_three_separate_channels(tmp_path):
    paths = Paths(tmp_path)
    for split in ("train", "valid", "test"):
        (paths.data / split / "001.Affenpinscher").mkdir(parents=True)
    (paths.data / "pretrained").mkdir()
    splits = locate_splits(paths)
    assert (splits.train, splits.valid, splits.test) == (paths.data / "train", paths.data / "valid",
                                                          paths.data / "test")
    assert splits.layout == "channels 'train', 'valid', 'test'"


def test_a_missing_separate_channel_is_named(tmp_path):
    paths = Paths(tmp_path)
    for split in ("train", "valid"):
        (paths.data / split).mkdir(parents=True)
    with pytest.raises(TrainingFailure, match=r"missing channel 'test': give the channels 'train', 'valid' and "
                                              r"'test' \(found: 'train', 'valid'\)"):
        locate_splits(paths)


def test_no_channel_at_all(tmp_path):
    paths = Paths(tmp_path)
    (paths.data / "pretrained").mkdir(parents=True)
    with pytest.raises(TrainingFailure, match=r"missing channel 'training'.*\(found: 'pretrained' under"):
        locate_splits(paths)


def test_a_training_channel_without_a_split_folder(tmp_path):
    paths = Paths(tmp_path)
    make_split_folders(paths.data / "training", splits=("train", "test"))
    with pytest.raises(TrainingFailure, match=r"the 'training' channel .* has no valid/ folder"):
        locate_splits(paths)


def test_both_layouts_at_once_are_ambiguous(tmp_path):
    paths = Paths(tmp_path)
    make_split_folders(paths.data / "training")
    (paths.data / "train").mkdir()
    with pytest.raises(TrainingFailure, match="both a 'training' channel and 'train' channels"):
        locate_splits(paths)


def test_pipe_mode_is_refused(tmp_path):
    paths = Paths(tmp_path)
    make_split_folders(paths.data / "training")
    paths.config.mkdir(parents=True)
    paths.input_data_config.write_text(json.dumps({"training": {"TrainingInputMode": "Pipe"}}))
    with pytest.raises(TrainingFailure, match="channel 'training' uses Pipe input mode"):
        locate_splits(paths)
    paths.input_data_config.write_text(json.dumps({"training": {"TrainingInputMode": "FastFile"}}))
    assert locate_splits(paths).train.name == "train"


def test_the_command_line_help_prints_every_setting(capsys):
    from kennel_train.main import cli

    with pytest.raises(SystemExit) as exit_info:
        cli(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "98% of the top-1 answers" in text  # a literal % in a setting's help
    from kennel_train import contract
    assert all(setting.flag in text for setting in contract.SETTINGS)
