"""What a run leaves in /opt/ml/output/data (output.tar.gz) for people to read.

    metrics.json                every epoch's train/valid loss and accuracy, the test result, data counts
    training-curves.png         loss and accuracy per epoch, train and valid
    per-class-accuracy.json/csv test accuracy of every class, with its image count

TensorBoard event files go to /opt/ml/output/tensorboard (SageMaker uploads that
folder when the job configures a TensorBoard output).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from . import atomic


def _finite(value: Any) -> Any:
    """JSON has no NaN: an undefined metric (no samples) is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_metrics(output_dir: Path, summary: dict[str, Any]) -> Path:
    path = output_dir / "metrics.json"
    atomic.write_text(path, json.dumps(_clean(summary), indent=2, sort_keys=True, default=str) + "\n")
    return path


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return _finite(value)


def per_class_rows(class_names: Sequence[str], correct: Sequence[float], count: Sequence[float]) -> list[dict]:
    return [{"index": index, "class_name": name, "images": int(n), "correct": int(c),
             "accuracy": (c / n) if n else None}
            for index, (name, c, n) in enumerate(zip(class_names, correct, count))]


def write_per_class(output_dir: Path, rows: list[dict]) -> None:
    atomic.write_text(output_dir / "per-class-accuracy.json", json.dumps(rows, indent=2) + "\n")
    lines = [["index", "class_name", "images", "correct", "accuracy"]]
    lines += [[row["index"], row["class_name"], row["images"], row["correct"],
               "" if row["accuracy"] is None else f"{row['accuracy']:.4f}"] for row in rows]
    text = io.StringIO(newline="")
    csv.writer(text).writerows(lines)
    atomic.write_text(output_dir / "per-class-accuracy.csv", text.getvalue())


def plot_curves(output_dir: Path, history: list[dict[str, Any]]) -> Path:
    """Loss and accuracy per epoch; a single epoch shows as points."""
    import matplotlib
    matplotlib.use("Agg")  # no display in a container
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
        for split in ("train", "valid"):
            axis.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker="o", label=split)
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    accuracy_axis.set_ylim(0, 1)
    figure.tight_layout()
    path = output_dir / "training-curves.png"
    output_dir.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


class TensorBoard:
    """Scalars per epoch (and the final test) as TensorBoard event files."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter
        log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def epoch(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                split, _, metric = key.partition("_")
                self.writer.add_scalar(f"{metric}/{split}", value, row["epoch"])
        self.writer.flush()

    def test(self, epoch: int, loss: float, accuracy: float) -> None:
        self.writer.add_scalar("loss/test", loss, epoch)
        self.writer.add_scalar("accuracy/test", accuracy, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
