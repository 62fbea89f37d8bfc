"""Training benchmark: the training loop against its baselines, side by side in one run.

    kennel-bench-train                       # ResNet-50, batch 32, 96 JPEGs, 2 rounds
    kennel-bench-train --images 64 --rounds 3 --json bench-train.json
    kennel-bench-train --accuracy-epochs 4   # also: what bf16 does to validation accuracy

Data: generated 500x375 JPEGs (kennel_train.sample, the size of a typical dog
photo), nothing downloaded; random weights (throughput does not depend on them).
Every variant trains the original setting: frozen backbone, the original head,
Adam, batch 32, one epoch over the same images. Rounds alternate the variants, so
a noisy shared host slows all of them alike; the ratios are per round, and the
median is reported.

1. Input pipeline: kennel's epoch end to end (JPEG files, decoding and augmentation
   in DataLoader workers, kennel_train.loop.train_one_epoch) against the same loop
   and model fed from tensors decoded and augmented in memory beforehand.
   Target: >= 0.9.
2. Frozen backbone: kennel's epoch end to end (fp32, and bf16 autocast) against a
   faithful re-creation of the original loop: ImageFolder + torchvision transforms
   in a DataLoader with default settings, model.train() over the whole network
   with requires_grad=False on the backbone, no inference mode, NCHW, loss and
   accuracy summed per batch and divided by the number of batches.
   Target: kennel >= 3 x the original.
3. (--accuracy-epochs N) validation accuracy after N epochs of the real program
   (python -m kennel_train, ResNet-18 from scratch, no pretrained weights) in fp32
   and in bf16 on the same generated data and seed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from kennel_artifact import IMAGENET_EVAL
from kennel_train import data, device, distributed, loop
from kennel_train.model import SplitModel, build_network
from kennel_train.sample import generate


class _NeverStop:
    requested = False


class Clock:
    """Wall time and CPU time (this process and its reaped children: loader workers) of one epoch.

    On a shared host other jobs stretch wall time; CPU seconds per image are what
    the variant itself cost, so both are reported."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *_exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu

    @staticmethod
    def _cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def figures(self, images: int) -> dict[str, float]:
        return {"images_per_second": images / self.wall, "images_per_cpu_second": images / self.cpu}


def local_group() -> distributed.Group:
    cluster = distributed.Cluster(hosts=("bench",), current_host="bench")
    settings = distributed.Settings()
    return distributed.join(distributed.plan(cluster, settings, cuda_devices=0), settings)


def kennel_model(architecture: str, classes: int, precision: str, engine: str
                 ) -> tuple[SplitModel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    runtime = device.Runtime(torch.device("cpu"), precision, cpus=device.usable_cpus(),
                             threads=torch.get_num_threads())
    model = SplitModel(build_network(architecture, "original", classes), fine_tune=False, runtime=runtime,
                       engine=engine)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def kennel_epoch(root: Path, architecture: str, batch_size: int, workers: int, precision: str, engine: str) -> dict:
    """kennel's training epoch end to end from JPEG files."""
    index = data.index_split("train", root / "train")
    dataset = data.ImageFiles(index.samples, data.TrainTransform(IMAGENET_EVAL))
    sampler = data.ResumableSampler(dataset, shuffle=True, seed=0)
    loader = data.make_loader(dataset, sampler, batch_size, workers, pin_memory=False, persistent=False)
    model, optimizer = kennel_model(architecture, len(index.classes), precision, engine)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    sampler.set_epoch(1)
    with Clock() as clock:  # the ONNX export of the frozen layers happened above: once per run, not per epoch
        result = loop.train_one_epoch(model, loader, optimizer, scaler, 1, 1, local_group(), _NeverStop(), 10**9)
        del loader  # its workers end (and their CPU time is counted) inside the clock
    return clock.figures(int(result.count))


def in_memory_batches(root: Path, batch_size: int) -> list[data.Batch]:
    """The same images decoded and augmented once, up front, and collated into batches."""
    index = data.index_split("train", root / "train")
    dataset = data.ImageFiles(index.samples, data.TrainTransform(IMAGENET_EVAL))
    torch.manual_seed(0)
    items = [dataset[i] for i in torch.randperm(len(dataset)).tolist()]
    return [data.collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def in_memory_epoch(batches: list[data.Batch], architecture: str, classes: int, precision: str, engine: str) -> dict:
    model, optimizer = kennel_model(architecture, classes, precision, engine)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with Clock() as clock:
        result = loop.train_one_epoch(model, batches, optimizer, scaler, 1, 1, local_group(), _NeverStop(), 10**9)
    return clock.figures(int(result.count))


def original_epoch(root: Path, architecture: str, batch_size: int) -> dict:
    """The original training loop, re-created: its transforms, its DataLoader, its model and metric code."""
    train_transform = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                          transforms.ToTensor()])
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=train_transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    torch.manual_seed(0)
    model = getattr(torchvision.models, architecture)()
    for parameter in model.parameters():
        parameter.requires_grad = False
    model.fc = nn.Sequential(nn.Linear(model.fc.in_features, 128), nn.ReLU(inplace=True),
                             nn.Linear(128, len(dataset.classes)))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=1e-3)
    model.train()
    running_loss, running_corrects = 0.0, 0
    with Clock() as clock:
        for inputs, labels in loader:
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            _, preds = torch.max(outputs, 1)
            running_loss += loss.item()
            running_corrects += torch.sum(preds == labels.data)
        epoch_loss = running_loss // len(loader)  # the original's metrics: per batch, integer division  # noqa: F841
        epoch_acc = running_corrects // len(loader)  # noqa: F841
    return clock.figures(len(dataset))


def accuracy_run(root: Path, precision: str, epochs: int, work: Path) -> dict:
    """The real program (in-process CLI) for ``epochs`` epochs; its metrics.json."""
    import os

    from kennel_train import main as program

    base = work / f"opt_ml_{precision}"
    (base / "input" / "data").mkdir(parents=True)
    (base / "input" / "data" / "training").symlink_to(root)
    os.environ["SAGEMAKER_BASE_DIR"] = str(base)
    with contextlib.redirect_stdout(io.StringIO()):
        code = program.cli(["--architecture", "resnet18", "--pretrained", "false", "--epochs", str(epochs),
                            "--batch-size", "16", "--learning-rate", "0.003", "--mixed-precision", precision,
                            "--seed", "1"])
    if code != 0:
        raise SystemExit(f"bench: the {precision} run failed: {(base / 'output' / 'failure').read_text()}")
    return json.loads((base / "output" / "data" / "metrics.json").read_text())


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return (f"{model}, {device.usable_cpus()} usable CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), native bf16: {device.cpu_has_native_bf16()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kennel-bench-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--images", type=int, default=96, help="training images (split over 3 classes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="kennel's loader workers (default: as training)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-bf16", action="store_true", help="leave out the bf16 variant")
    parser.add_argument("--accuracy-epochs", type=int, default=0, help="also compare fp32/bf16 validation accuracy")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    logging.getLogger("kennel_train").setLevel(logging.WARNING)
    workers = args.workers if args.workers is not None else min(device.usable_cpus(), 8)
    print(f"machine: {machine()}", flush=True)
    results: dict = {"machine": machine(), "architecture": args.architecture, "batch_size": args.batch_size,
                     "images": args.images, "workers": workers, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        classes = 3
        root = generate(work / "data", classes=classes, counts={"train": args.images // classes, "valid": 8,
                                                                 "test": 2})
        batches = in_memory_batches(root, args.batch_size)
        variants = {
            "original": lambda: original_epoch(root, args.architecture, args.batch_size),
            "kennel_fp32": lambda: kennel_epoch(root, args.architecture, args.batch_size, workers, "fp32",
                                                "onnxruntime"),
            "in_memory_fp32": lambda: in_memory_epoch(batches, args.architecture, classes, "fp32", "onnxruntime"),
            "kennel_fp32_torch": lambda: kennel_epoch(root, args.architecture, args.batch_size, workers, "fp32",
                                                      "torch"),
        }
        if not args.skip_bf16:
            variants["kennel_bf16_torch"] = lambda: kennel_epoch(root, args.architecture, args.batch_size, workers,
                                                                 "bf16", "torch")
        for round_number in range(args.rounds):
            order = list(variants) if round_number % 2 == 0 else list(reversed(variants))
            figures = {}
            for name in order:
                figures[name] = variants[name]()
                print(f"round {round_number + 1} {name}: {figures[name]['images_per_second']:.2f} images/s, "
                      f"{figures[name]['images_per_cpu_second']:.3f} images per CPU second", flush=True)
            results["rounds"].append(figures)

        def ratio(numerator: str, denominator: str, measure: str) -> list[float]:
            return [r[numerator][measure] / r[denominator][measure] for r in results["rounds"]]

        pairs = {"pipeline (kennel fp32 / in-memory fp32)": ("kennel_fp32", "in_memory_fp32"),
                 "frozen backbone (kennel fp32, onnxruntime / original)": ("kennel_fp32", "original"),
                 "frozen backbone (kennel fp32, torch / original)": ("kennel_fp32_torch", "original")}
        if not args.skip_bf16:
            pairs["frozen backbone (kennel bf16, torch / original)"] = ("kennel_bf16_torch", "original")
        results["median"] = {}
        for measure in ("images_per_second", "images_per_cpu_second"):
            medians = {name: statistics.median(r[name][measure] for r in results["rounds"]) for name in variants}
            print(f"median {measure}: " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()))
            results["median"][measure] = {"variants": medians, "ratios": {}}
            for label, (numerator, denominator) in pairs.items():
                values = ratio(numerator, denominator, measure)
                results["median"][measure]["ratios"][label] = statistics.median(values)
                print(f"ratio of {measure}, {label}: {statistics.median(values):.2f} "
                      f"(rounds: {', '.join(f'{v:.2f}' for v in values)})")
        if args.accuracy_epochs:
            accuracy = {}
            for precision in ("fp32", "bf16"):
                started = time.perf_counter()
                metrics = accuracy_run(root, precision, args.accuracy_epochs, work)
                accuracy[precision] = {"valid_accuracy": [row["valid_accuracy"] for row in metrics["epochs"]],
                                       "valid_loss": metrics["epochs"][-1]["valid_loss"],
                                       "test_accuracy": metrics["test"]["accuracy"],
                                       "seconds": time.perf_counter() - started}
                print(f"accuracy {precision}: valid accuracy per epoch "
                      f"{[round(a, 4) for a in accuracy[precision]['valid_accuracy']]}, last valid loss "
                      f"{accuracy[precision]['valid_loss']:.4f}, test accuracy (fp32 evaluation) "
                      f"{accuracy[precision]['test_accuracy']:.4f}, {accuracy[precision]['seconds']:.0f} s", flush=True)
            results["accuracy"] = accuracy
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
