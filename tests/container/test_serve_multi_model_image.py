"""The serving image as a multi-model endpoint on a real Docker engine, as SageMaker runs one:
SAGEMAKER_MULTI_MODEL=true, the models under /opt/ml/models, a memory limit that cannot
hold every model SageMaker asks for. Reached through 127.0.0.1 only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import serve_support as support
from kennel_ops.bench.models import write_random_model
from test_serve_image import PHOTO, Container, containers  # noqa: F401 (fixtures)

pytestmark = pytest.mark.container

MEMORY_LIMIT = "1200m"


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    """/opt/ml/models: two models of one frozen backbone, four that share nothing (ResNet-18, ~45 MB each)."""
    root = tmp_path_factory.mktemp("opt-ml-models")
    for name, head in (("shared-a", 1), ("shared-b", 2)):
        write_random_model(root / name / "model", "resnet18", num_classes=5, seed=0, head_seed=head, split=True)
    for seed in range(4):
        write_random_model(root / f"whole-{seed}" / "model", "resnet18", num_classes=5, seed=10 + seed)
    root.chmod(0o755)
    return root


def numbers(answer) -> list[float]:
    """Every number of a JSON answer, in order (the split graph differs from the whole by float rounding)."""
    if isinstance(answer, dict):
        return [n for key in sorted(answer) for n in numbers(answer[key])]
    if isinstance(answer, list):
        return [n for item in answer for n in numbers(item)]
    return [answer] if isinstance(answer, (int, float)) and not isinstance(answer, bool) else []


def post_model(container: Container, name: str):
    body = json.dumps({"model_name": name, "url": f"/opt/ml/models/{name}/model"}).encode()
    return support.http(f"{container.url}/models", body, {"Content-Type": "application/json"}, method="POST")


def invoke(container: Container, name: str):
    return support.http(f"{container.url}/models/{name}/invoke", PHOTO,
                        {"Content-Type": "image/jpeg", "Accept": "application/json"}, method="POST")


def test_models_come_and_go_and_a_load_memory_cannot_hold_is_507_then_fits_after_an_unload(
        serve_image, models_root, containers):  # noqa: F811
    container = Container(serve_image, None, env={"SAGEMAKER_MULTI_MODEL": "true"},
                          extra=["-v", f"{models_root}:/opt/ml/models:ro", "--memory", MEMORY_LIMIT,
                                 "--memory-swap", MEMORY_LIMIT, "--cpus", "2"])
    containers.append(container)
    container.wait_ready()
    for name in ("shared-a", "shared-b"):
        assert post_model(container, name).status == 200
        assert invoke(container, name).status == 200
    # the same answer as the model's own single-model endpoint
    single = Container(serve_image, models_root / "shared-a" / "model")
    containers.append(single)
    single.wait_ready()
    expected = single.invoke(PHOTO, accept="application/json").json()
    got = invoke(container, "shared-a").json()
    assert numbers(got) == pytest.approx(numbers(expected), rel=1e-4, abs=1e-5)
    single.remove()
    # SageMaker keeps loading models as they are invoked; the memory runs out before all four whole ones
    loaded, refused = [], None
    for seed in range(4):
        name = f"whole-{seed}"
        reply = post_model(container, name)
        if reply.status == 507:
            refused = (name, reply.json()["error"])
            break
        assert reply.status == 200, reply.body
        assert invoke(container, name).status == 200
        loaded.append(name)
    assert refused is not None, f"all of {loaded} fit in {MEMORY_LIMIT}"
    assert refused[1].startswith(f"not enough memory to load model {refused[0]}: it needs about "), refused
    state = container.state()
    assert state["Running"] and not state["OOMKilled"]
    assert support.http(f"{container.url}/ping").status == 200
    # what SageMaker does next: unload what was least used, and load again
    for name in ["shared-a", "shared-b", *loaded]:
        assert support.http(f"{container.url}/models/{name}", method="DELETE").status == 200
    reply = post_model(container, refused[0])
    assert reply.status == 200, reply.body
    assert invoke(container, refused[0]).status == 200
    listed = support.http(f"{container.url}/models").json()["models"]
    assert [m["modelName"] for m in listed] == [refused[0]]
    assert not container.state()["OOMKilled"]
