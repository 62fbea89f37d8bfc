"""kennel_train.export: the model directory serving reads, and ONNX parity with PyTorch on real images."""
from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
import torchvision
from torch import nn

import kennel_artifact
from kennel_artifact import IMAGENET_EVAL, Manifest
from kennel_train import export
from kennel_train.failure import TrainingFailure
from kennel_train.model import build_network, describe_head

CLASSES = ["001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier"]


def served_inputs(dataset_root, preprocessing=IMAGENET_EVAL) -> np.ndarray:
    files = sorted((dataset_root / "test").rglob("*.jpg"))
    return np.stack([preprocessing.apply(kennel_artifact.decode_image(f.read_bytes())) for f in files])


def trained_looking_network() -> torch.nn.Module:
    torch.manual_seed(0)
    network = build_network("resnet18", "original", len(CLASSES))
    with torch.no_grad():  # scale the head up so logits are far from zero, as after training
        for parameter in network.fc.parameters():
            parameter.mul_(20)
    return network.to(memory_format=torch.channels_last)  # as training leaves it


def manifest_for(network) -> Manifest:
    return Manifest(architecture="resnet18", class_names=CLASSES, preprocessing=IMAGENET_EVAL,
                    head=describe_head(network, "original"), metrics={"test_accuracy": 0.5})


@pytest.fixture(scope="module")
def exported(tmp_path_factory, generated_dataset):
    """One export shared by the tests that only read it: (network after export, model dir, served inputs)."""
    network = trained_looking_network().train()
    model_dir = tmp_path_factory.mktemp("model")
    inputs = served_inputs(generated_dataset)
    parity = export.write_model_dir(model_dir, network, manifest_for(network), torch.from_numpy(inputs[:4]))
    return network, model_dir, inputs, parity


def test_onnx_scores_equal_pytorch_on_real_images(exported):
    network, model_dir, inputs, parity = exported
    manifest = kennel_artifact.load(model_dir)  # what serving does first: manifest, checksum, files
    assert manifest.metrics["onnx_max_abs_diff"] == parity["onnx_max_abs_diff"] < 1e-3
    assert manifest.metrics["test_accuracy"] == 0.5 and manifest.class_names == CLASSES
    session = onnxruntime.InferenceSession(str(model_dir / kennel_artifact.ONNX_FILE),
                                           providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [kennel_artifact.ONNX_INPUT]
    assert session.get_inputs()[0].shape == ["batch", 3, 224, 224]
    onnx_logits = session.run([kennel_artifact.ONNX_OUTPUT], {kennel_artifact.ONNX_INPUT: inputs})[0]
    with torch.inference_mode():
        torch_logits = export.serving_copy(network)(torch.from_numpy(inputs)).numpy()
    assert onnx_logits.shape == (len(inputs), len(CLASSES))
    assert np.abs(torch_logits).max() > 1.0
    assert np.abs(onnx_logits - torch_logits).max() < 1e-3 * np.abs(torch_logits).max()


def test_model_pth_is_a_plain_state_dict_in_the_standard_layout(exported):
    _, model_dir, _, _ = exported
    state = torch.load(model_dir / kennel_artifact.WEIGHTS_FILE, weights_only=True)
    assert all(value.is_contiguous() for value in state.values())
    original = torchvision.models.resnet18()
    original.fc = nn.Sequential(nn.Linear(512, 128), nn.ReLU(inplace=True), nn.Linear(128, 3))
    original.load_state_dict(state, strict=True)
    assert (model_dir / kennel_artifact.WEIGHTS_FILE).stat().st_mode & 0o044 == 0o044  # readable by serving's user


def test_the_training_network_is_left_as_it_was(exported):
    network = exported[0]
    assert network.training and network.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_an_export_that_does_not_reproduce_the_model_fails_and_installs_nothing(tmp_path, generated_dataset,
                                                                                 monkeypatch):
    network = trained_looking_network()
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no difference can be within a negative tolerance
    with pytest.raises(TrainingFailure, match=r"the ONNX export does not reproduce the PyTorch model: max abs "
                                              r"difference .* on 2 evaluation images exceeds"):
        export.write_model_dir(tmp_path, network, manifest_for(network),
                               torch.from_numpy(served_inputs(generated_dataset)[:2]))
    assert not (tmp_path / kennel_artifact.ONNX_FILE).exists()
    assert not (tmp_path / kennel_artifact.MANIFEST_FILE).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

