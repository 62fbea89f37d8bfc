"""INT8: the gate that decides whether model.int8.onnx ships, the artifact's record of it, and the
graph serving chooses (KENNEL_PRECISION). Random-weight ResNet-18s on generated images: nothing is downloaded."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kennel_artifact
from kennel_ops.bench.models import write_random_model
from kennel_artifact import ArtifactError
from kennel_serve import precision
from kennel_serve.engine import KennelModel
from kennel_serve.settings import ServeSettings, SettingsError
from kennel_train import data, quantize
from kennel_train.convert import ConvertError, int8_images

# The documented tolerance (docs/serving.md, "INT8"): every probability within 0.05 of
# FP32's, every raw score within 20 % of the largest FP32 score's magnitude.
PROBABILITY_TOLERANCE = 0.05
SCORE_TOLERANCE = 0.2


def splits(dataset: Path) -> tuple[list, list, list]:
    train = data.index_split("train", dataset / "train")
    valid = data.index_split("valid", dataset / "valid", train.classes)
    test = data.index_split("test", dataset / "test", train.classes)
    return train.samples, valid.samples, test.samples


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("fp32") / "model", "resnet18", num_classes=3)


@pytest.fixture(scope="module")
def int8_model(fp32_model, generated_dataset, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("int8") / "model"
    shutil.copytree(fp32_model, model)
    train, valid, _ = splits(generated_dataset)
    record = quantize.build_int8(model, kennel_artifact.read_manifest(model), train, valid)
    assert record["shipped"], record
    return model


def copy_model(model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / "model"))


def test_a_model_that_passes_the_gate_ships_int8_with_both_figures(int8_model):
    manifest = kennel_artifact.load(int8_model)  # verifies both checksums
    record = manifest.int8
    assert manifest.has_int8 and (int8_model / kennel_artifact.INT8_FILE).is_file()
    assert record["shipped"] is True and "within the gate" in record["reason"]
    assert record["calibration_images"] == 18 and record["validation_images"] == 6
    assert record["fp32_top1"] - record["int8_top1"] <= quantize.MAX_TOP1_DROP
    assert record["agreement"] >= quantize.MIN_AGREEMENT
    assert record["seconds"] >= 0
    assert quantize.describe(record).startswith("int8 shipped: fp32_top1=")


def test_a_model_that_fails_the_gate_ships_fp32_only_with_the_reason(fp32_model, generated_dataset, tmp_path):
    model = copy_model(fp32_model, tmp_path)
    train, valid, _ = splits(generated_dataset)
    impossible = quantize.Gate(max_top1_drop=-1.0, min_agreement=1.01)  # no graph can pass it
    record = quantize.build_int8(model, kennel_artifact.read_manifest(model), train, valid, gate=impossible)
    assert record["shipped"] is False
    assert "top-1 accuracy drops" in record["reason"] and "agreement with FP32" in record["reason"]
    assert {"fp32_top1", "int8_top1", "agreement"} <= set(record)
    assert not (model / kennel_artifact.INT8_FILE).exists() and not list(model.glob(".model.int8.*"))
    manifest = kennel_artifact.load(model)
    assert manifest.int8 == record and not manifest.has_int8
    # Serving then answers with FP32 whatever KENNEL_PRECISION asks, and says why.
    served = KennelModel.load(model, precision_setting="int8")
    assert served.precision.precision == "fp32" and "no INT8 graph" in served.precision.reason
    assert "agreement with FP32" in served.precision.reason


def test_a_quantizer_failure_is_a_reason_not_a_failed_job(fp32_model, generated_dataset, tmp_path, monkeypatch):
    model = copy_model(fp32_model, tmp_path)
    train, valid, _ = splits(generated_dataset)

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator\nmore detail")

    monkeypatch.setattr(quantize, "quantize", broken)
    record = quantize.build_int8(model, kennel_artifact.read_manifest(model), train, valid)
    assert record["shipped"] is False and record["reason"] == "quantization failed: unsupported operator"
    assert kennel_artifact.load(model).int8 == record


def test_an_earlier_int8_graph_does_not_outlive_a_run_that_turns_it_off(int8_model, tmp_path):
    model = copy_model(int8_model, tmp_path)
    record = quantize.skip(model, kennel_artifact.read_manifest(model), "turned off")
    assert record == {"shipped": False, "reason": "turned off"}
    assert not (model / kennel_artifact.INT8_FILE).exists() and not kennel_artifact.load(model).has_int8


@pytest.mark.parametrize("fp32, int8, agreement, refused", [
    (0.90, 0.895, 0.98, None),
    (0.90, 0.894, 0.99, "drops 0.60 points"),
    (0.90, 0.91, 0.97, "agreement with FP32 is 97.00%"),
    (0.90, float("nan"), 1.0, "drops nan points"),
])
def test_the_gate_thresholds(fp32, int8, agreement, refused):
    verdict = quantize.Gate().verdict(fp32, int8, agreement)
    assert verdict is None if refused is None else refused in verdict


def test_calibration_draws_every_class_evenly_and_the_same_files_every_time():
    samples = [(f"{label}/{i}.jpg", label) for label in range(3) for i in range(10 * (label + 1))]
    chosen = quantize.calibration_sample(samples, count=9)
    assert sorted(label for _, label in chosen) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert chosen == quantize.calibration_sample(samples, count=9)
    assert len(quantize.calibration_sample(samples, count=1000)) == len(samples)


def test_a_replaced_int8_graph_is_refused_by_its_checksum(int8_model, tmp_path):
    model = copy_model(int8_model, tmp_path)
    (model / kennel_artifact.INT8_FILE).write_bytes(b"not the graph that passed the gate")
    with pytest.raises(ArtifactError, match="model.int8.onnx does not match the checksum"):
        kennel_artifact.load(model)
    (model / kennel_artifact.INT8_FILE).unlink()
    with pytest.raises(ArtifactError, match="model.int8.onnx not found"):
        kennel_artifact.load(model)


def test_a_manifest_from_before_int8_still_loads_and_serves_fp32(fp32_model, tmp_path):
    model = copy_model(fp32_model, tmp_path)
    manifest = json.loads((model / "kennel.json").read_text())
    for key in ("int8", "int8_sha256"):
        manifest.pop(key, None)
    (model / "kennel.json").write_text(json.dumps(manifest))
    assert kennel_artifact.load(model).int8 is None
    served = KennelModel.load(model, precision_setting="auto")
    assert served.precision == precision.Choice("fp32", "auto", "the model has no INT8 graph")


def images_of(samples) -> list[Image.Image]:
    return [kennel_artifact.decode_image(Path(path).read_bytes()) for path, _ in samples]


def test_int8_answers_are_within_the_documented_tolerance_of_fp32(int8_model, generated_dataset):
    _, valid, test = splits(generated_dataset)
    images = images_of(valid + test)
    fp32 = KennelModel.load(int8_model, precision_setting="fp32")
    int8 = KennelModel.load(int8_model, precision_setting="int8", threads=1, solo_threads=2)
    assert (fp32.precision.precision, int8.precision.precision) == ("fp32", "int8")
    assert int8.onnx_path.name == kennel_artifact.INT8_FILE
    int8.warm_up()  # finite scores of the right shape, both sessions
    expected, got = fp32.predict(images), int8.predict(images)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=SCORE_TOLERANCE * max(1.0, float(np.abs(expected).max())))
    np.testing.assert_allclose(kennel_artifact.softmax(got), kennel_artifact.softmax(expected), rtol=0,
                               atol=PROBABILITY_TOLERANCE)
    # The solo session (a request alone) runs the same INT8 graph: the same answers.
    int8.others_busy = lambda: True
    busy = int8.predict(images[:2])
    int8.others_busy = lambda: False
    np.testing.assert_allclose(int8.predict(images[:2]), busy, rtol=1e-3, atol=1e-3)


def test_auto_measures_both_graphs_on_this_cpu_and_keeps_int8_only_by_the_margin(int8_model, tmp_path):
    model = KennelModel.load(int8_model, precision_setting="auto", state_dir=tmp_path)
    choice = model.precision
    assert choice.setting == "auto" and choice.speedup is not None and choice.speedup > 0
    assert choice.precision == ("int8" if choice.speedup >= precision.INT8_MIN_SPEEDUP else "fp32")
    assert model.onnx_path.name == (kennel_artifact.INT8_FILE if choice.precision == "int8" else "model.onnx")
    assert choice.header() == f"{choice.precision}; setting=auto; speedup={choice.speedup:.2f}"
    # Another worker of the same server reads the choice instead of measuring again.
    again = KennelModel.load(int8_model, precision_setting="auto", state_dir=tmp_path)
    assert again.precision == choice


@pytest.mark.parametrize("ratio, chosen", [(1.1, "fp32"), (precision.INT8_MIN_SPEEDUP, "int8"), (3.0, "int8")])
def test_auto_keeps_int8_only_when_it_is_faster_by_the_margin(ratio, chosen):
    choice = precision.decide("auto", True, {"shipped": True}, lambda: ratio)
    assert choice.precision == chosen and choice.speedup == ratio


def test_pinned_settings_do_not_measure():
    def no_measuring():
        raise AssertionError("measured")
    assert precision.decide("fp32", True, None, no_measuring).precision == "fp32"
    assert precision.decide("int8", True, None, no_measuring).precision == "int8"
    assert precision.decide("auto", False, None, no_measuring).precision == "fp32"


def test_the_first_worker_decides_and_the_others_read_its_choice(tmp_path):
    made = []

    def make():
        made.append(1)
        return precision.Choice("int8", "auto", "measured", 2.5)

    first = precision.shared_choice(tmp_path, "server-1", make)
    second = precision.shared_choice(tmp_path, "server-1", make)
    assert first == second and len(made) == 1
    precision.shared_choice(tmp_path, "server-2", make)  # another server (or model) decides anew
    assert len(made) == 2


def test_kennel_precision_setting():
    assert ServeSettings.from_env({}).precision == "auto"
    assert ServeSettings.from_env({"KENNEL_PRECISION": " INT8 "}).precision == "int8"
    with pytest.raises(SettingsError, match="KENNEL_PRECISION='int4' must be one of auto, fp32, int8"):
        ServeSettings.from_env({"KENNEL_PRECISION": "int4"})


def test_convert_takes_dogimages_layout_or_plain_class_folders(generated_dataset, tmp_path):
    classes = data.class_folders(generated_dataset / "train")
    calibration, validation = int8_images(generated_dataset, classes)
    assert len(calibration) == 18 and len(validation) == 6
    calibration, validation = int8_images(generated_dataset / "test", classes)
    assert len(calibration) == 3 and len(validation) == 3
    with pytest.raises(ConvertError, match="holds no images in folders named as the model's classes"):
        int8_images(generated_dataset, ["001.Not_a_breed_here"])
    with pytest.raises(ConvertError, match="is not a folder"):
        int8_images(tmp_path / "missing", classes)
