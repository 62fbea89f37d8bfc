"""kennel_train.export: the model directory serving reads, ONNX parity with PyTorch on real images, and the
backbone.onnx + head.onnx split that models trained with one frozen backbone share."""
from __future__ import annotations

import types

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torchvision
from onnx import numpy_helper
from torch import nn

import kennel_artifact
from kennel_artifact import IMAGENET_EVAL, ArtifactError, Manifest, Preprocessing
from kennel_train import distributed, export, loop
from kennel_train.data import Batch
from kennel_train.device import Runtime
from kennel_train.failure import TrainingFailure
from kennel_train.model import SplitModel, build_network, describe_head

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


def manifest_for(network, head: str = "original", classes=CLASSES, preprocessing=IMAGENET_EVAL) -> Manifest:
    return Manifest(architecture="resnet18", class_names=classes, preprocessing=preprocessing,
                    head=describe_head(network, head), metrics={"test_accuracy": 0.5})


def session(path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, generated_dataset):
    """One export shared by the tests that only read it: (network after export, model dir, served inputs)."""
    network = trained_looking_network().train()
    model_dir = tmp_path_factory.mktemp("model")
    inputs = served_inputs(generated_dataset)
    parity = export.write_model_dir(model_dir, network, manifest_for(network), torch.from_numpy(inputs[:4]),
                                    backbone_frozen=True)
    return network, model_dir, inputs, parity


def test_onnx_scores_equal_pytorch_on_real_images(exported):
    network, model_dir, inputs, parity = exported
    manifest = kennel_artifact.load(model_dir)  # what serving does first: manifest, checksum, files
    assert manifest.metrics["onnx_max_abs_diff"] == parity["onnx_max_abs_diff"] < 1e-3
    assert manifest.metrics["test_accuracy"] == 0.5 and manifest.class_names == CLASSES
    whole = session(model_dir / kennel_artifact.ONNX_FILE)
    assert [i.name for i in whole.get_inputs()] == [kennel_artifact.ONNX_INPUT]
    assert whole.get_inputs()[0].shape == ["batch", 3, 224, 224]
    onnx_logits = whole.run([kennel_artifact.ONNX_OUTPUT], {kennel_artifact.ONNX_INPUT: inputs})[0]
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
                               torch.from_numpy(served_inputs(generated_dataset)[:2]), backbone_frozen=True)
    assert not (tmp_path / kennel_artifact.ONNX_FILE).exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".onnx"]
    assert not (tmp_path / kennel_artifact.MANIFEST_FILE).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_split_that_does_not_reproduce_the_model_fails_and_installs_nothing(tmp_path, generated_dataset,
                                                                              monkeypatch):
    network = trained_looking_network()
    cut = export.split_onnx

    def broken(onnx_path, features):  # a head whose weights are not the model's: the two no longer add up
        backbone, head = cut(onnx_path, features)
        graph = onnx.load_from_string(head)
        weight = graph.graph.initializer[0]
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2, weight.name))
        return backbone, graph.SerializeToString()

    monkeypatch.setattr(export, "split_onnx", broken)
    model_dir = tmp_path / "model"
    with pytest.raises(TrainingFailure, match=r"the split export \(backbone.onnx then head.onnx\) does not reproduce "
                                              r"the PyTorch model: max abs difference .* on 2 evaluation images"):
        export.write_model_dir(model_dir, network, manifest_for(network),
                               torch.from_numpy(served_inputs(generated_dataset)[:2]), backbone_frozen=True)
    assert not [p for p in model_dir.iterdir() if p.suffix == ".onnx" or p.name.startswith(".")]
    assert not (model_dir / kennel_artifact.MANIFEST_FILE).exists()


# --------------------------------------------------------------------------- the shared backbone


def test_backbone_then_head_scores_as_model_onnx_on_real_images(exported):
    network, model_dir, inputs, parity = exported
    manifest = kennel_artifact.load_split(model_dir)  # what a multi-model endpoint does first
    assert manifest.shares_backbone and manifest.backbone["features"] == 512
    assert manifest.metrics["split_onnx_max_abs_diff"] == parity["split_onnx_max_abs_diff"] < 1e-3
    backbone = session(model_dir / kennel_artifact.BACKBONE_FILE)
    head = session(model_dir / kennel_artifact.HEAD_FILE)
    assert [(i.name, i.shape) for i in backbone.get_inputs()] == [("images", ["batch", 3, 224, 224])]
    assert [(o.name, o.shape) for o in backbone.get_outputs()] == [("features", ["batch", 512])]
    assert [(i.name, i.shape) for i in head.get_inputs()] == [("features", ["batch", 512])]
    assert [(o.name, o.shape) for o in head.get_outputs()] == [("logits", ["batch", len(CLASSES)])]
    whole = session(model_dir / kennel_artifact.ONNX_FILE).run(["logits"], {"images": inputs})[0]
    for batch in (inputs, inputs[:1]):
        split = head.run(["logits"], {"features": backbone.run(["features"], {"images": batch})[0]})[0]
        assert np.abs(split - whole[:len(batch)]).max() < 1e-3 * np.abs(whole).max()
    assert manifest.backbone["sha256"] == export.backbone_identity(network.state_dict(), (224, 224))


SMALL = Preprocessing(resize=(32, 32), center_crop=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
CPU = Runtime(torch.device("cpu"), "fp32", cpus=1, threads=torch.get_num_threads())


def train_a_little(head: str, classes: int, fine_tune: bool, seed: int) -> torch.nn.Module:
    """A network of the seed-0 initial weights, trained for a few steps by the training loop, as a job would."""
    torch.manual_seed(0)
    network = build_network("resnet18", head, classes)
    model = SplitModel(network, fine_tune=fine_tune, runtime=CPU)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    batches = [Batch(torch.randn(4, 3, 32, 32, generator=generator),
                     torch.randint(0, classes, (4,), generator=generator), torch.arange(4 * i, 4 * i + 4), [])
               for i in range(3)]
    cluster = distributed.Cluster(hosts=("algo-1",), current_host="algo-1")
    group = distributed.join(distributed.plan(cluster, distributed.Settings(), cuda_devices=0), distributed.Settings())
    loop.train_one_epoch(model, batches, optimizer, torch.amp.GradScaler("cpu", enabled=False), 1, 1, group,
                         types.SimpleNamespace(requested=False), interval=100)
    return network


def write_small(model_dir, network, head: str, classes: list[str], frozen: bool) -> Manifest:
    manifest = manifest_for(network, head, classes, SMALL)
    images = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32))
    export.write_model_dir(model_dir, network, manifest, images, backbone_frozen=frozen)
    return manifest


def test_models_trained_on_one_frozen_backbone_share_it_and_differ_in_their_heads(tmp_path):
    torch.manual_seed(0)
    initial = export.backbone_identity(build_network("resnet18", "original", 3).state_dict(), (32, 32))
    first = write_small(tmp_path / "first", train_a_little("original", 3, fine_tune=False, seed=1), "original",
                        ["a", "b", "c"], frozen=True)
    second = write_small(tmp_path / "second", train_a_little("linear", 5, fine_tune=False, seed=2), "linear",
                         ["a", "b", "c", "d", "e"], frozen=True)
    # Frozen means unchanged, BatchNorm statistics included: the identity is the initial backbone's.
    assert first.backbone["sha256"] == second.backbone["sha256"] == initial
    assert first.backbone["head_onnx_sha256"] != second.backbone["head_onnx_sha256"]
    for name, manifest in (("first", first), ("second", second)):
        loaded = kennel_artifact.load_split(tmp_path / name)
        assert loaded.backbone == manifest.backbone and loaded.backbone["features"] == 512
        assert loaded.backbone["head_onnx_sha256"] == kennel_artifact.sha256_file(tmp_path / name / "head.onnx")
    # Either model's head runs on the other's backbone: the resident one serves both.
    images = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    features = session(tmp_path / "first" / "backbone.onnx").run(["features"], {"images": images})[0]
    for name in ("first", "second"):
        logits = session(tmp_path / name / "head.onnx").run(["logits"], {"features": features})[0]
        whole = session(tmp_path / name / "model.onnx").run(["logits"], {"images": images})[0]
        assert np.abs(logits - whole).max() <= 1e-3 * max(1.0, np.abs(whole).max())


def test_a_fine_tuned_backbone_is_not_shared(tmp_path):
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    initial = export.backbone_identity(build_network("resnet18", "original", 3).state_dict(), (32, 32))
    model_dir.mkdir()
    for name in ("backbone.onnx", "head.onnx"):  # an earlier run's, in a folder used again (compose's ./model)
        (model_dir / name).write_bytes(b"earlier")
    network = train_a_little("original", 3, fine_tune=True, seed=1)
    assert export.backbone_identity(network.state_dict(), (32, 32)) != initial
    manifest = write_small(model_dir, network, "original", ["a", "b", "c"], frozen=False)
    assert manifest.backbone is None and not manifest.shares_backbone
    assert kennel_artifact.load(model_dir).backbone is None
    # The earlier run's split went with it: a model directory holds no file its manifest does not record.
    assert sorted(p.name for p in model_dir.iterdir()) == ["kennel.json", "model.onnx", "model.pth"]
    with pytest.raises(ArtifactError, match="records no shared backbone: the model was trained with "
                                            "freeze_backbone=false"):
        kennel_artifact.load_split(model_dir)


def test_the_identity_is_the_backbones_weights_and_the_input_size():
    torch.manual_seed(0)
    state = build_network("resnet18", "original", 3).state_dict()
    identity = export.backbone_identity(state, (224, 224))
    assert export.backbone_identity(state, (192, 224)) != identity != export.backbone_identity(state, (224, 192))
    changed = dict(state)
    changed["fc.2.weight"] = torch.zeros_like(state["fc.2.weight"])  # the head: not the backbone
    changed["bn1.num_batches_tracked"] = torch.tensor(99)  # counts steps, never read by inference
    changed["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"].to(memory_format=torch.channels_last)
    assert export.backbone_identity(changed, (224, 224)) == identity
    for key in ("layer4.1.bn2.running_var", "conv1.weight"):
        changed = dict(state)
        changed[key] = state[key].clone()
        changed[key].view(-1)[0] += 1e-3
        assert export.backbone_identity(changed, (224, 224)) != identity, key
