"""A worker's models on a multi-model endpoint (kennel_serve.multi_model), the jobs it takes, and the routes' list.

Real small models (random ResNet-18 weights, generated here): two share a frozen
backbone, one does not.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import kennel_artifact
from kennel_artifact import ArtifactError, Preprocessing
from kennel_ops.bench.models import write_random_model
from kennel_serve import engine, multi_model
from kennel_serve.mms_toolkit.multi_model_routes import Registry
from kennel_serve.mms_toolkit.multi_model_transformer import Job, endpoint_job
from kennel_serve.multi_model import InsufficientMemory, MultiModelHost, SharedBackboneModel
from kennel_serve.settings import ServeSettings

SMALL = Preprocessing(resize=72, center_crop=64, mean=kennel_artifact.IMAGENET_MEAN, std=kennel_artifact.IMAGENET_STD)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mme-models")
    return {"a": write_random_model(root / "a", num_classes=5, preprocessing=SMALL, seed=0, head_seed=1, split=True),
            "b": write_random_model(root / "b", num_classes=7, preprocessing=SMALL, seed=0, head_seed=2, split=True),
            "c": write_random_model(root / "c", num_classes=4, preprocessing=SMALL, seed=3)}


@pytest.fixture
def host(tmp_path) -> MultiModelHost:
    settings = ServeSettings(model_dir=tmp_path / "none", state_dir=tmp_path / "state", multi_model=True)
    settings.state_dir.mkdir()
    return MultiModelHost(settings, watch=False)


def whole_model_logits(model_dir: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_dir / kennel_artifact.ONNX_FILE), providers=["CPUExecutionProvider"])
    return session.run(None, {kennel_artifact.ONNX_INPUT: batch})[0]


def batch_of(count: int) -> np.ndarray:
    return np.random.default_rng(5).standard_normal((count, 3, 64, 64)).astype(np.float32)


def write_registry(host: MultiModelHost, listed: dict[str, tuple[Path, str]]) -> None:
    path = host.settings.state_dir / multi_model.REGISTRY_FILE
    path.write_text(json.dumps({"models": {n: {"url": str(u), "token": int(t)} for n, (u, t) in listed.items()}}))


def test_models_of_one_frozen_backbone_share_it_and_answer_as_their_whole_graphs(host, models):
    a = host.load("a", str(models["a"]), "1")
    b = host.load("b", str(models["b"]), "2")
    assert isinstance(a, SharedBackboneModel) and isinstance(b, SharedBackboneModel)
    assert a.backbone is b.backbone and len(host.backbones) == 1
    batch = batch_of(10)  # more than engine.FORWARD_BATCH: the backbone runs it in parts
    for name, model in (("a", a), ("b", b)):
        np.testing.assert_allclose(model.forward(batch), whole_model_logits(models[name], batch), rtol=1e-4,
                                   atol=1e-4)
    assert a.forward(batch).shape == (10, 5) and b.forward(batch).shape == (10, 7)


def test_a_model_without_a_shared_backbone_loads_whole(host, models):
    c = host.load("c", str(models["c"]), "1")
    assert isinstance(c, engine.KennelModel) and host.backbones == {}
    batch = batch_of(2)
    np.testing.assert_allclose(c.forward(batch), whole_model_logits(models["c"], batch), rtol=1e-5, atol=1e-5)


def test_get_loads_once_per_token_and_a_new_token_reloads(host, models):
    first = host.get("a", str(models["a"]), "1")
    assert host.get("a", str(models["a"]), "1") is first
    assert host.get("a", str(models["a"]), "9") is not first


def test_models_the_endpoint_no_longer_lists_are_dropped_and_the_last_user_frees_the_backbone(host, models):
    host.load("a", str(models["a"]), "1")
    host.load("b", str(models["b"]), "2")
    host.load("c", str(models["c"]), "3")
    write_registry(host, {"b": (models["b"], "2"), "c": (models["c"], "3")})
    host.sync()
    assert sorted(host.models) == ["b", "c"] and len(host.backbones) == 1
    write_registry(host, {"c": (models["c"], "3")})
    host.sync()
    assert sorted(host.models) == ["c"] and host.backbones == {}
    write_registry(host, {"c": (models["c"], "4")})  # unloaded and loaded again: another model to the workers
    host.sync()
    assert host.models == {}


def test_a_load_that_memory_cannot_hold_is_refused_before_anything_is_loaded(host, models, monkeypatch):
    monkeypatch.setattr(multi_model, "MEMORY_WAIT_S", 0.0)
    monkeypatch.setattr(multi_model, "available_memory", lambda: 64 * 1024 * 1024)
    with pytest.raises(InsufficientMemory, match=r"not enough memory to load model a: it needs about \d+ MiB"):
        host.load("a", str(models["a"]), "1")
    assert host.models == {} and host.backbones == {}


def test_with_the_backbone_resident_a_load_needs_only_the_heads_memory(host, models, monkeypatch):
    host.load("a", str(models["a"]), "1")
    head_bytes = (models["b"] / kennel_artifact.HEAD_FILE).stat().st_size
    backbone_bytes = (models["b"] / kennel_artifact.BACKBONE_FILE).stat().st_size
    assert head_bytes * 50 < backbone_bytes
    monkeypatch.setattr(multi_model, "MEMORY_WAIT_S", 0.0)
    monkeypatch.setattr(multi_model, "available_memory", lambda: multi_model.MEMORY_RESERVE + backbone_bytes)
    host.load("b", str(models["b"]), "2")  # fits: only its head is new
    with pytest.raises(InsufficientMemory):
        host.load("c", str(models["c"]), "3")  # a whole model does not


def test_models_that_bring_code_or_do_not_match_their_checksums_are_refused(host, models, tmp_path):
    with_code = tmp_path / "with-code"
    shutil.copytree(models["a"], with_code)
    (with_code / "code").mkdir()
    with pytest.raises(ArtifactError, match="brings code/"):
        host.load("x", str(with_code), "1")
    tampered = tmp_path / "tampered"
    shutil.copytree(models["b"], tampered)
    (tampered / kennel_artifact.HEAD_FILE).write_bytes((models["a"] / kennel_artifact.HEAD_FILE).read_bytes())
    with pytest.raises(ArtifactError, match=kennel_artifact.HEAD_FILE):
        host.load("y", str(tampered), "2")
    with pytest.raises(ArtifactError, match="not found"):
        host.load("z", str(tmp_path), "3")
    assert host.models == {} and host.backbones == {}


def test_only_jobs_with_the_secret_are_jobs():
    headers = {"X-Kennel-Mme-Op": "invoke", "x-kennel-mme-model": "a", "X-KENNEL-MME-URL": "/opt/ml/models/a/model",
               "X-Kennel-Mme-Token": "3", "X-Kennel-Mme-Secret": "s3cret", "Content-Type": "image/jpeg"}
    assert endpoint_job(headers, "s3cret") == Job("invoke", "a", "/opt/ml/models/a/model", "3")
    assert endpoint_job({k.encode(): v.encode() for k, v in headers.items()}, "s3cret") == Job(
        "invoke", "a", "/opt/ml/models/a/model", "3")
    assert endpoint_job(headers, "other") is None
    assert endpoint_job({**headers, "X-Kennel-Mme-Secret": ""}, "") is None  # no secret configured: nothing is a job
    assert endpoint_job({**headers, "X-Kennel-Mme-Op": "delete"}, "s3cret") is None
    assert endpoint_job({k: v for k, v in headers.items() if k != "X-Kennel-Mme-Token"}, "s3cret") is None


def test_the_routes_registry_lists_loaded_models_in_pages_and_writes_them_for_the_workers(tmp_path):
    registry = Registry(tmp_path)
    assert json.loads((tmp_path / "models.json").read_text()) == {"models": {}}
    entries = {name: registry.reserve(name, f"/m/{name}") for name in ("c", "a", "b", "d")}
    assert registry.reserve("a", "/elsewhere") is None  # taken while it loads: 409
    for name in ("a", "b", "c"):
        registry.finish(name, entries[name], ok=True)
    registry.finish("d", entries["d"], ok=False)  # a failed load leaves nothing behind
    assert registry.loaded("d") is None and registry.reserve("d", "/m/d") is not None
    page, last = registry.page(None, 2)
    assert [name for name, _ in page] == ["a", "b"] and last == "b"
    page, last = registry.page("b", 2)
    assert [name for name, _ in page] == ["c"] and last is None  # "d" is loading: not listed
    listed = json.loads((tmp_path / "models.json").read_text())["models"]
    assert sorted(listed) == ["a", "b", "c"] and listed["a"] == {"url": "/m/a", "token": entries["a"].token}
    assert len({entry.token for entry in entries.values()}) == 4
    assert registry.remove("a") and not registry.remove("a")
    assert sorted(json.loads((tmp_path / "models.json").read_text())["models"]) == ["b", "c"]


def test_the_endpoints_load_makes_room_for_every_worker_and_a_workers_first_request_for_its_own(
        tmp_path, models, monkeypatch):
    settings = ServeSettings(model_dir=tmp_path / "none", state_dir=tmp_path / "state", workers=2, multi_model=True)
    settings.state_dir.mkdir()
    host = MultiModelHost(settings, watch=False)
    one_copy = int((models["c"] / kennel_artifact.ONNX_FILE).stat().st_size * multi_model.RESIDENT_PER_FILE_BYTE)
    monkeypatch.setattr(multi_model, "MEMORY_WAIT_S", 0.0)
    monkeypatch.setattr(multi_model, "available_memory", lambda: multi_model.MEMORY_RESERVE + one_copy + 1024)
    with pytest.raises(InsufficientMemory, match="for 2 worker"):
        host.load("c", str(models["c"]), "1")  # POST /models: both workers will hold it
    assert isinstance(host.get("c", str(models["c"]), "1"), engine.KennelModel)  # the other worker's lazy load
