"""One pass over a split: training (forward, backward, step) or evaluation (forward only).

Loss and accuracy are per-SAMPLE means: the loop adds up ``loss * batch size``,
correct predictions and sample counts, and divides once at the end (a mean of
batch means lets an uneven last batch and the batch size itself skew the
numbers). The sums are plain numbers, so
data-parallel ranks add theirs with one all-reduce (``group.all_sum``).

At every step boundary the loop asks ``group.stop_requested``: SIGTERM on any
rank stops all of them at the same step, and :class:`Interrupted` carries the
sums so far into the checkpoint.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .model import SplitModel
from .progress import Progress


@dataclass
class PassResult:
    """Sums of one pass; ``loss``/``accuracy`` divide by the number of samples."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    positions: int = 0                                  # sampler positions consumed (read or skipped)
    steps: int = 0                                      # batches done
    skipped: list[int] = field(default_factory=list)    # dataset indices that could not be decoded
    seconds: float = 0.0
    per_class_correct: list[float] = field(default_factory=list)
    per_class_count: list[float] = field(default_factory=list)
    skipped_total: int | None = None                    # over every rank, once reduced

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else math.nan

    @property
    def images_per_second(self) -> float:
        return (self.count + len(self.skipped)) / self.seconds if self.seconds > 0 else 0.0

    def add(self, sums: torch.Tensor) -> None:
        loss_sum, correct, count = sums.tolist()
        self.loss_sum += loss_sum
        self.correct += correct
        self.count += count

    def reduced(self, group) -> "PassResult":
        """The sums over every rank (the identity for one process)."""
        classes = len(self.per_class_count)
        totals = group.all_sum([self.loss_sum, self.correct, self.count, len(self.skipped),
                                *self.per_class_correct, *self.per_class_count])
        return PassResult(totals[0], totals[1], totals[2], self.positions, self.steps, self.skipped, self.seconds,
                          totals[4:4 + classes], totals[4 + classes:], int(totals[3]))

    @property
    def skipped_count(self) -> int:
        return len(self.skipped) if self.skipped_total is None else self.skipped_total

    def to_json(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "count": self.count, "positions": self.positions,
                "steps": self.steps, "skipped": list(self.skipped), "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PassResult":
        return cls(float(data["loss_sum"]), float(data["correct"]), float(data["count"]), int(data["positions"]),
                   int(data["steps"]), [int(i) for i in data["skipped"]], float(data["seconds"]))


class Interrupted(Exception):
    """A stop was requested; ``partial`` holds the sums of the unfinished pass."""

    def __init__(self, phase: str, epoch: int, step: int, partial: PassResult, hosts: list[str]):
        super().__init__(f"stopped during {phase} of epoch {epoch} at step {step}")
        self.phase, self.epoch, self.step, self.partial, self.hosts = phase, epoch, step, partial, hosts


def _sums(loss_sum: torch.Tensor, correct: torch.Tensor, count: int) -> torch.Tensor:
    return torch.stack([loss_sum.detach().double(), correct.double(), correct.new_tensor(count).double()])


def train_one_epoch(model: SplitModel, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, epoch: int, epochs: int, group, stop, interval: int,
                    resumed: PassResult | None = None) -> PassResult:
    """Train over ``loader``; ``resumed`` holds the sums of the part of this epoch done before a stop."""
    result = resumed or PassResult()
    device = model.runtime.device
    model.train()
    progress = Progress("train", epoch, epochs, result.steps + len(loader), interval)
    running = torch.zeros(3, dtype=torch.float64, device=device)  # summed on the device: no sync per step
    started = time.monotonic()
    for step, batch in enumerate(loader, start=result.steps + 1):
        result.steps = step
        result.positions += batch.positions
        result.skipped += batch.unreadable
        if len(batch.labels):
            images = model.to_device(batch.images)
            labels = batch.labels.to(device, non_blocking=True)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            running += _sums(loss * len(labels), (logits.argmax(1) == labels).sum(), len(labels))
        progress.step(step, len(batch.labels), lambda: _running_loss(result, running))
        stopping = group.stop_requested(stop.requested)
        if stopping:
            result.add(running.cpu())
            result.seconds += time.monotonic() - started
            progress.finish()
            raise Interrupted("train", epoch, step, result, stopping)
    result.add(running.cpu())
    result.seconds += time.monotonic() - started
    progress.finish()
    return result


def _running_loss(result: PassResult, running: torch.Tensor) -> float:
    loss_sum, _, count = running.tolist()
    total = result.count + count
    return (result.loss_sum + loss_sum) / total if total else math.nan


def evaluate(model: SplitModel, loader: DataLoader, phase: str, epoch: int, epochs: int, num_classes: int, group,
             stop, interval: int, autocast: bool = True) -> PassResult:
    """Loss, accuracy and per-class counts over ``loader``; ``autocast=False`` measures in float32."""
    device = model.runtime.device
    model.eval()
    progress = Progress(phase, epoch, epochs, len(loader), interval)
    running = torch.zeros(3, dtype=torch.float64, device=device)
    class_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
    class_count = torch.zeros(num_classes, dtype=torch.float64, device=device)
    result = PassResult()
    started = time.monotonic()
    with torch.inference_mode():
        for step, batch in enumerate(loader, start=1):
            result.steps = step
            result.positions += batch.positions
            result.skipped += batch.unreadable
            if len(batch.labels):
                labels = batch.labels.to(device, non_blocking=True)
                logits = model(model.to_device(batch.images), autocast=autocast)
                hits = logits.argmax(1) == labels
                running += _sums(F.cross_entropy(logits, labels, reduction="sum"), hits.sum(), len(labels))
                class_count += torch.bincount(labels, minlength=num_classes)
                class_correct += torch.bincount(labels[hits], minlength=num_classes)
            progress.step(step, len(batch.labels), None)
            # Ranks' evaluation shards may differ by a batch, so several ranks agree on a stop
            # only after the pass (below); one process stops at the next step.
            if not group.distributed and stop.requested:
                progress.finish()
                raise Interrupted(phase, epoch, step, result, group.stop_requested(True))
    result.add(running.cpu())
    result.per_class_correct = class_correct.tolist()
    result.per_class_count = class_count.tolist()
    result.seconds = time.monotonic() - started
    progress.finish()
    stopping = group.stop_requested(stop.requested)
    if stopping:
        raise Interrupted(phase, epoch, result.steps, result, stopping)
    return result
