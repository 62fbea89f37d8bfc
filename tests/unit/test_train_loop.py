"""kennel_train.loop and model: per-sample metrics over uneven batches, the frozen backbone, stopping mid-epoch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kennel_train import distributed, loop
from kennel_train.data import Batch
from kennel_train.device import Runtime
from kennel_train.failure import TrainingFailure
from kennel_train.model import (SplitModel, build_network, describe_head, find_pretrained,
                                load_backbone)


class Stop:
    def __init__(self, after_steps: int | None = None):
        self.after_steps, self.steps = after_steps, 0

    @property
    def requested(self) -> bool:
        return self.after_steps is not None and self.steps >= self.after_steps


def local_group() -> distributed.Group:
    cluster = distributed.Cluster(hosts=("algo-1",), current_host="algo-1")
    return distributed.join(distributed.plan(cluster, distributed.Settings(), cuda_devices=0), distributed.Settings())


CPU = Runtime(torch.device("cpu"), "fp32", cpus=1, threads=torch.get_num_threads())


def tiny_model(fine_tune: bool = False, classes: int = 3) -> SplitModel:
    torch.manual_seed(0)
    return SplitModel(build_network("resnet18", "original", classes), fine_tune=fine_tune, runtime=CPU)


def batches(sizes, classes=3, seed=0) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    out, start = [], 0
    for size in sizes:
        out.append(Batch(torch.randn(size, 3, 32, 32, generator=generator),
                         torch.randint(0, classes, (size,), generator=generator),
                         torch.arange(start, start + size), []))
        start += size
    return out


class Counting(list):
    """A 'loader' of prepared batches that tells the Stop how many were taken."""

    def __init__(self, items, stop: Stop | None = None):
        super().__init__(items)
        self.stop = stop

    def __iter__(self):
        for item in super().__iter__():
            if self.stop is not None:
                self.stop.steps += 1
            yield item


def test_evaluation_loss_and_accuracy_are_per_sample_means_over_uneven_batches():
    model = tiny_model()
    data = batches([5, 5, 1])
    result = loop.evaluate(model, Counting(data), "valid", 1, 1, 3, local_group(), Stop(), interval=100)
    images = torch.cat([b.images for b in data])
    labels = torch.cat([b.labels for b in data])
    model.eval()
    with torch.inference_mode():
        logits = model.network(images)
    assert result.count == 11
    assert result.loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert result.accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    # The original's number: the mean of batch means, which over-weights the 1-image batch.
    batch_means = [F.cross_entropy(model.network(b.images), b.labels).item() for b in data]
    assert not math.isclose(result.loss, sum(batch_means) / len(batch_means), rel_tol=1e-3)
    assert result.per_class_count == torch.bincount(labels, minlength=3).double().tolist()
    assert sum(result.per_class_correct) == result.correct


def test_training_loss_is_the_per_sample_mean_of_what_each_step_saw():
    model = tiny_model()
    head_before = [p.detach().clone() for p in model.network.fc.parameters()]
    backbone_before = {k: v.clone() for k, v in model.network.state_dict().items() if not k.startswith("fc.")}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    data = batches([4, 4, 3])
    result = loop.train_one_epoch(model, Counting(data), optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                  1, 1, local_group(), Stop(), interval=100)
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model.network(torch.cat([b.images for b in data])),
                                   torch.cat([b.labels for b in data])).item()
    assert (result.count, result.steps, result.positions) == (11, 3, 11)
    assert result.loss == pytest.approx(expected, rel=1e-5)
    # Frozen means frozen: the backbone's weights AND BatchNorm statistics are untouched.
    assert all(torch.equal(v, model.network.state_dict()[k]) for k, v in backbone_before.items())
    assert all(torch.equal(a, b) for a, b in zip(head_before, model.network.fc.parameters()))


def test_only_the_head_learns_with_a_frozen_backbone_and_layer4_too_when_fine_tuning():
    for fine_tune, trainable in ((False, {"fc"}), (True, {"fc", "layer4"})):
        model = tiny_model(fine_tune)
        names = {name for name, p in model.network.named_parameters()
                 if any(p is q for q in model.parameters())}
        assert {name.split(".")[0] for name in names} == trainable
        before = {k: v.clone() for k, v in model.network.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loop.train_one_epoch(model, Counting(batches([4])), optimizer, torch.amp.GradScaler("cpu", enabled=False),
                             1, 1, local_group(), Stop(), interval=100)
        changed = {k.split(".")[0] for k, v in model.network.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == trainable


def test_a_stop_request_ends_the_pass_at_the_next_step_with_the_sums_so_far():
    model = tiny_model()
    stop = Stop(after_steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(loop.Interrupted) as caught:
        loop.train_one_epoch(model, Counting(batches([4, 4, 4, 4]), stop), optimizer,
                             torch.amp.GradScaler("cpu", enabled=False), 3, 5, local_group(), stop, interval=100)
    interrupted = caught.value
    assert (interrupted.phase, interrupted.epoch, interrupted.step) == ("train", 3, 2)
    assert (interrupted.partial.steps, interrupted.partial.positions, interrupted.partial.count) == (2, 8, 8)
    assert interrupted.hosts == ["algo-1"]
    # The rest of the epoch continues from those sums: the result covers all 16 samples.
    resumed = loop.PassResult.from_json(interrupted.partial.to_json())
    result = loop.train_one_epoch(model, Counting(batches([4, 4], seed=1)), optimizer,
                                  torch.amp.GradScaler("cpu", enabled=False), 3, 5, local_group(), Stop(), 100,
                                  resumed)
    assert (result.count, result.steps, result.positions) == (16, 4, 16)


def test_skipped_images_are_counted_not_averaged():
    model = tiny_model()
    data = batches([3])
    data.append(Batch(torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                      [7, 8]))
    result = loop.evaluate(model, Counting(data), "test", 1, 1, 3, local_group(), Stop(), 100)
    assert (result.count, result.positions, result.skipped, result.skipped_count) == (3, 5, [7, 8], 2)
    reduced = result.reduced(local_group())
    assert (reduced.loss, reduced.skipped_count) == (pytest.approx(result.loss), 2)


def test_empty_results_are_nan_not_a_division_error():
    assert math.isnan(loop.PassResult().loss) and math.isnan(loop.PassResult().accuracy)


def test_state_dict_loads_into_the_original_definition():
    network = build_network("resnet50", "original", 133)
    original = torchvision.models.resnet50()
    original.fc = nn.Sequential(nn.Linear(2048, 128), nn.ReLU(inplace=True), nn.Linear(128, 133))
    original.load_state_dict(network.state_dict(), strict=True)
    assert describe_head(network, "original")["layers"] == ["Linear(2048, 128)", "ReLU(inplace=True)",
                                                            "Linear(128, 133)"]
    assert describe_head(build_network("resnet18", "linear", 5), "linear")["layers"] == ["Linear(512, 5)"]



def test_pretrained_weights_come_from_the_channel_whatever_their_name(tmp_path):
    channel = tmp_path / "pretrained"
    channel.mkdir()
    torch.manual_seed(5)
    weights = torchvision.models.resnet18().state_dict()
    torch.save(weights, channel / "imagenet-backbone.pth")
    path = find_pretrained("resnet18", channel)
    network = build_network("resnet18", "original", 3)
    head = network.fc[0].weight.clone()
    load_backbone(network, path)
    assert torch.equal(network.conv1.weight, weights["conv1.weight"])
    assert torch.equal(network.fc[0].weight, head)  # the ImageNet classifier is not the head
    torch.save(weights, channel / "second.pth")
    with pytest.raises(TrainingFailure, match="the 'pretrained' channel holds 2 weight files"):
        find_pretrained("resnet18", channel)


def test_pretrained_weights_are_found_in_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    with pytest.raises(TrainingFailure) as caught:
        find_pretrained("resnet50", None)
    assert "resnet50-0676ba61.pth (https://download.pytorch.org/models/resnet50-0676ba61.pth)" in str(caught.value)
    (cache / "resnet50-11ad3fa6.pth").write_bytes(b"")  # torchvision's IMAGENET1K_V2 file name
    assert find_pretrained("resnet50", None) == cache / "resnet50-11ad3fa6.pth"


def test_weights_of_another_architecture_or_not_weights_at_all_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(TrainingFailure, match=r"the pretrained weights r18.pth do not fit resnet of this "
                                              r"architecture: missing \d+ keys .*wrong shapes"):
        load_backbone(build_network("resnet50", "original", 3), tmp_path / "r18.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(TrainingFailure, match="cannot load the pretrained weights text.pth"):
        load_backbone(build_network("resnet18", "original", 3), tmp_path / "text.pth")


def test_the_onnx_runtime_engine_computes_the_torch_features_and_trains_the_same_head():
    runtime = Runtime(torch.device("cpu"), "fp32", cpus=1, threads=torch.get_num_threads())
    models = {}
    for engine in ("torch", "onnxruntime"):
        torch.manual_seed(0)
        models[engine] = SplitModel(build_network("resnet18", "original", 3), fine_tune=False, runtime=runtime,
                                    engine=engine, input_size=(32, 32))
    data = batches([4, 3])
    results = {}
    for engine, model in models.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        results[engine] = loop.train_one_epoch(model, Counting(data), optimizer,
                                               torch.amp.GradScaler("cpu", enabled=False), 1, 1, local_group(),
                                               Stop(), 100)
    assert results["onnxruntime"].loss == pytest.approx(results["torch"].loss, rel=1e-4)
    head = {engine: model.network.fc[2].weight for engine, model in models.items()}
    assert torch.allclose(head["onnxruntime"], head["torch"], atol=1e-5)
    with pytest.raises(TrainingFailure, match="backbone_engine=onnxruntime runs on the CPU in fp32 only"):
        SplitModel(build_network("resnet18", "original", 3), False,
                   Runtime(torch.device("cpu"), "bf16", 1, 1), engine="onnxruntime")
