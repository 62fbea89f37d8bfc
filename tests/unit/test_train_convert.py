"""kennel_train.convert: an original system model.tar.gz becomes a model directory that scores like the original."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import onnxruntime
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

import kennel_artifact
from kennel_artifact import ORIGINAL_EVAL
from kennel_train import convert, export
from kennel_train.breeds import DOG_IMAGES_CLASSES


def original_model(architecture: str = "resnet50", classes: int = 133) -> nn.Module:
    """The original system's definition, as its train script built it."""
    torch.manual_seed(7)
    model = getattr(torchvision.models, architecture)()
    model.fc = nn.Sequential(nn.Linear(model.fc.in_features, 128), nn.ReLU(inplace=True), nn.Linear(128, classes))
    return model.eval()


def model_tar(tmp_path, model: nn.Module):
    """model.tar.gz exactly as the original job left it: one model.pth state_dict."""
    torch.save(model.cpu().state_dict(), tmp_path / "model.pth")
    with tarfile.open(tmp_path / "model.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "model.pth", arcname="model.pth")
    return tmp_path / "model.tar.gz"


def test_the_133_dogimages_classes():
    assert len(DOG_IMAGES_CLASSES) == 133 == len(set(DOG_IMAGES_CLASSES))
    assert list(DOG_IMAGES_CLASSES) == sorted(DOG_IMAGES_CLASSES)
    assert DOG_IMAGES_CLASSES[0] == "001.Affenpinscher" and DOG_IMAGES_CLASSES[-1] == "133.Yorkshire_terrier"
    assert all(name.startswith(f"{i:03d}.") for i, name in enumerate(DOG_IMAGES_CLASSES, start=1))


def test_a_converted_original_model_returns_the_original_endpoints_logits(tmp_path, generated_dataset, capsys):
    model = original_model()
    assert convert.main(["--model-tar", str(model_tar(tmp_path, model)), "--output", str(tmp_path / "out")]) == 0
    assert "converted to" in capsys.readouterr().out
    manifest = kennel_artifact.load(tmp_path / "out")
    assert manifest.class_names == list(DOG_IMAGES_CLASSES)
    assert manifest.preprocessing == ORIGINAL_EVAL and manifest.architecture == "resnet50"
    assert manifest.head["layers"] == ["Linear(2048, 128)", "ReLU(inplace=True)", "Linear(128, 133)"]
    # The original endpoint: Resize((224, 224)), ToTensor, model(x); raw logits. Here: the same JPEGs
    # through kennel_artifact (what the serving image runs) and the ONNX file.
    files = sorted((generated_dataset / "test").rglob("*.jpg"))[:3]
    original_transform = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])
    with torch.inference_mode():
        expected = model(torch.stack([original_transform(Image.open(f)) for f in files])).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    served = np.stack([manifest.preprocessing.apply(kennel_artifact.decode_image(f.read_bytes())) for f in files])
    logits = session.run(["logits"], {"images": served})[0]
    assert logits.shape == (3, 133)
    assert np.abs(logits - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())
    state = torch.load(tmp_path / "out" / "model.pth", weights_only=True)
    original_model().load_state_dict(state, strict=True)
    # The original trained the head only: the backbone ships apart, as the original weights at 224x224.
    split = kennel_artifact.load_split(tmp_path / "out")
    assert split.backbone["sha256"] == export.backbone_identity(model.state_dict(), (224, 224))
    assert split.backbone["features"] == 2048


def test_another_architecture_with_its_class_names_file(tmp_path):
    model = original_model("resnet18", classes=3)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    (tmp_path / "names.txt").write_text("a.cat\nb.dog\nc.fox\n")
    code = convert.main(["--model-pth", str(tmp_path / "weights.pth"), "--architecture", "resnet18",
                         "--class-names", str(tmp_path / "names.txt"), "--output", str(tmp_path / "out")])
    assert code == 0
    assert kennel_artifact.load(tmp_path / "out").class_names == ["a.cat", "b.dog", "c.fox"]


def error_of(capsys, *argv: str) -> str:
    assert convert.main(list(argv)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convert: error: ")
    return err.strip()


def test_wrong_files_get_one_line_each(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    out = str(tmp_path / "out")
    assert "does not exist" in error_of(capsys, "--model-tar", str(tmp_path / "absent.tar.gz"), "--output", out)
    assert "is not a readable .tar.gz archive" in error_of(capsys, "--model-tar", str(tmp_path / "notes.txt"),
                                                           "--output", out)
    assert "is not a PyTorch state_dict saved with torch.save" in error_of(
        capsys, "--model-pth", str(tmp_path / "notes.txt"), "--output", out)
    with tarfile.open(tmp_path / "empty.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "notes.txt", arcname="code/notes.txt")
    assert "holds no model.pth (it holds: code/notes.txt)" in error_of(
        capsys, "--model-tar", str(tmp_path / "empty.tar.gz"), "--output", out)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    assert "does not hold a state_dict" in error_of(capsys, "--model-pth", str(tmp_path / "list.pth"),
                                                    "--output", out)
    torch.save(model_state := original_model("resnet18", 133).state_dict(), tmp_path / "r18.pth")
    message = error_of(capsys, "--model-pth", str(tmp_path / "r18.pth"), "--output", out)
    assert "does not fit resnet50 with the original head" in message and "wrong shapes" in message
    torch.save({k: v for k, v in model_state.items() if not k.startswith("fc.")}, tmp_path / "headless.pth")
    assert "has no classifier head" in error_of(capsys, "--model-pth", str(tmp_path / "headless.pth"),
                                                "--output", out)
    assert not (tmp_path / "out").exists()


def test_class_names_must_match_the_model(tmp_path, capsys):
    torch.save(original_model("resnet18", classes=3).state_dict(), tmp_path / "m.pth")
    args = ["--model-pth", str(tmp_path / "m.pth"), "--architecture", "resnet18", "--output", str(tmp_path / "o")]
    assert "the model has 3 classes, not dogImages' 133: give --class-names FILE" in error_of(capsys, *args)
    (tmp_path / "two.json").write_text(json.dumps(["a", "b"]))
    assert "lists 2 class names, the model has 3 classes" in error_of(
        capsys, *args, "--class-names", str(tmp_path / "two.json"))
    (tmp_path / "unsorted.txt").write_text("b\na\nc\n")
    assert "must be distinct and in sorted order" in error_of(
        capsys, *args, "--class-names", str(tmp_path / "unsorted.txt"))


@pytest.mark.parametrize("argv", [[], ["--output", "x"], ["--model-tar", "a", "--model-pth", "b", "--output", "x"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        convert.main(argv)
    assert caught.value.code == 2
