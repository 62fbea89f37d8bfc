"""INT8: a statically quantized copy of model.onnx, shipped only when it keeps the FP32 model's answers.

ONNX Runtime's static quantization, QDQ format: weights int8 per output channel,
activations uint8 per tensor (the U8S8 pair ONNX Runtime's x86 kernels, VNNI and
AMX included, are built for), activation ranges calibrated (min/max) on a few
hundred training images through the evaluation preprocessing, the function
serving applies. The quantized graph has the FP32 graph's input and output.

The gate: both graphs score the validation split; model.int8.onnx ships only when
top-1 accuracy drops by at most MAX_TOP1_DROP (0.5 points) and the two graphs'
top-1 answers agree on at least MIN_AGREEMENT (98 %) of the images. Either way
the decision, both figures and the reason go into the manifest's ``int8`` record;
a failure of the quantizer itself is such a reason, never a failed job.

Used by the training job after export (setting ``int8``) and by convert when given
images.
"""
from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

import kennel_artifact
from kennel_artifact import ImageError, Manifest, Preprocessing

log = logging.getLogger("kennel_train")

CALIBRATION_IMAGES = 300  # ONNX Runtime's guidance for CNNs: a few hundred representative images
MAX_TOP1_DROP = 0.005
MIN_AGREEMENT = 0.98
BATCH = 8


@dataclass(frozen=True)
class Gate:
    max_top1_drop: float = MAX_TOP1_DROP
    min_agreement: float = MIN_AGREEMENT

    def verdict(self, fp32_top1: float, int8_top1: float, agreement: float) -> str | None:
        """None when INT8 may ship, else why not."""
        drop = fp32_top1 - int8_top1
        reasons = []
        # Accuracies are ratios of counts: a drop of exactly the limit must not fail on rounding.
        if not drop <= self.max_top1_drop + 1e-9:  # NaN fails too
            reasons.append(f"top-1 accuracy drops {drop * 100:.2f} points ({fp32_top1:.4f} -> {int8_top1:.4f}), "
                           f"more than {self.max_top1_drop * 100:.2f}")
        if not agreement >= self.min_agreement:
            reasons.append(f"top-1 agreement with FP32 is {agreement:.2%}, below {self.min_agreement:.0%}")
        return "; ".join(reasons) or None


def skip(model_dir: Path, manifest: Manifest, reason: str) -> dict[str, Any]:
    """Record that no INT8 graph was made, and why (an earlier run's graph is removed)."""
    (model_dir / kennel_artifact.INT8_FILE).unlink(missing_ok=True)
    manifest.int8 = {"shipped": False, "reason": reason}
    kennel_artifact.write_manifest(model_dir, manifest)
    return manifest.int8


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = _threads()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _batches(samples: Sequence[tuple[str, int]], preprocessing: Preprocessing) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images [n, 3, H, W], labels [n]) in batches of BATCH; unreadable files are left out."""
    images, labels = [], []
    for path, label in samples:
        try:
            with open(path, "rb") as fh:
                images.append(preprocessing.apply(kennel_artifact.decode_image(fh.read())))
            labels.append(label)
        except (OSError, ImageError):
            continue
        if len(images) == BATCH:
            yield np.stack(images), np.asarray(labels)
            images, labels = [], []
    if images:
        yield np.stack(images), np.asarray(labels)


def calibration_sample(samples: Sequence[tuple[str, int]], count: int = CALIBRATION_IMAGES,
                       seed: int = 0) -> list[tuple[str, int]]:
    """``count`` samples drawn evenly from every class (a seeded draw: the same files every run)."""
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    rng = random.Random(seed)
    for members in by_class.values():
        rng.shuffle(members)
    chosen: list[tuple[str, int]] = []
    # Round-robin over the classes: each gets its share before any gets more.
    queues = [members for _, members in sorted(by_class.items())]
    while len(chosen) < count and any(queues):
        for members in queues:
            if members and len(chosen) < count:
                chosen.append(members.pop())
    return chosen


def quantize(fp32_path: Path, int8_path: Path, calibration: Sequence[tuple[str, int]],
             preprocessing: Preprocessing) -> int:
    """Write the INT8 graph of ``fp32_path`` to ``int8_path``; returns the number of calibration images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    count = 0

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = _batches(calibration, preprocessing)

        def get_next(self):
            nonlocal count
            batch = next(self._batches, None)
            if batch is None:
                return None
            count += len(batch[0])
            return {kennel_artifact.ONNX_INPUT: batch[0]}

    # Memory: the min/max calibrator keeps, per batch, only the minimum and maximum of each
    # tensor (ReduceMin/ReduceMax added to the graph), not the activations. Its option to fold
    # them in periodically (CalibMaxIntermediateOutputs) drops batches in ONNX Runtime 1.32.
    with tempfile.TemporaryDirectory(prefix="kennel-int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Shape inference and graph clean-up first, as ONNX Runtime's quantization guide advises.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    if count == 0:
        raise ValueError("no readable calibration image")
    return count


@dataclass
class Comparison:
    images: int
    fp32_top1: float
    int8_top1: float
    agreement: float
    max_abs_logit_diff: float
    max_abs_probability_diff: float

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "fp32_top1": self.fp32_top1, "int8_top1": self.int8_top1,
                "agreement": self.agreement, "max_abs_logit_diff": self.max_abs_logit_diff,
                "max_abs_probability_diff": self.max_abs_probability_diff}


def compare(fp32_path: Path, int8_path: Path, samples: Sequence[tuple[str, int]],
            preprocessing: Preprocessing) -> Comparison:
    """Both graphs on the same images: top-1 of each, their agreement and their largest differences."""
    fp32, int8 = _session(fp32_path), _session(int8_path)
    images = fp32_right = int8_right = agree = 0
    logit_diff = probability_diff = 0.0
    for batch, labels in _batches(samples, preprocessing):
        feed = {kennel_artifact.ONNX_INPUT: batch}
        (a,) = fp32.run([kennel_artifact.ONNX_OUTPUT], feed)
        (b,) = int8.run([kennel_artifact.ONNX_OUTPUT], feed)
        top_a, top_b = a.argmax(axis=1), b.argmax(axis=1)
        images += len(labels)
        fp32_right += int((top_a == labels).sum())
        int8_right += int((top_b == labels).sum())
        agree += int((top_a == top_b).sum())
        logit_diff = max(logit_diff, float(np.abs(a - b).max()))
        probability_diff = max(probability_diff,
                               float(np.abs(kennel_artifact.softmax(a) - kennel_artifact.softmax(b)).max()))
    if images == 0:
        raise ValueError("no readable validation image")
    return Comparison(images, fp32_right / images, int8_right / images, agree / images, logit_diff, probability_diff)


def build_int8(model_dir: Path, manifest: Manifest, calibration: Sequence[tuple[str, int]],
               validation: Sequence[tuple[str, int]], gate: Gate = Gate(), seed: int = 0) -> dict[str, Any]:
    """Quantize model_dir/model.onnx, gate it, install model.int8.onnx when it passes; the decision record.

    The manifest is rewritten with the record (and the INT8 checksum when it ships);
    whatever happens here, the FP32 model directory stays as it was.
    """
    started = time.monotonic()
    fp32_path = model_dir / kennel_artifact.ONNX_FILE
    final = model_dir / kennel_artifact.INT8_FILE
    staged = model_dir / f".model.int8.{os.getpid()}.onnx"
    final.unlink(missing_ok=True)  # an earlier run's INT8 graph must not outlive its decision
    record: dict[str, Any] = {"shipped": False, "max_top1_drop": gate.max_top1_drop,
                              "min_agreement": gate.min_agreement}
    try:
        if not validation:
            raise ValueError("no validation images to compare FP32 and INT8 on")
        chosen = calibration_sample(calibration, seed=seed)
        record["calibration_images"] = quantize(fp32_path, staged, chosen, manifest.preprocessing)
        comparison = compare(fp32_path, staged, validation, manifest.preprocessing)
        record.update(comparison.to_json(), validation_images=comparison.images,
                      top1_drop=comparison.fp32_top1 - comparison.int8_top1)
        del record["images"]
        refusal = gate.verdict(comparison.fp32_top1, comparison.int8_top1, comparison.agreement)
        if refusal is None:
            os.replace(staged, final)
            record.update(shipped=True, reason=f"top-1 {comparison.fp32_top1:.4f} (FP32) -> "
                          f"{comparison.int8_top1:.4f} (INT8), agreement {comparison.agreement:.2%}: within the gate")
        else:
            record["reason"] = refusal
    except Exception as error:  # noqa: BLE001 - the quantizer fails in its own ways; FP32 still ships
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        record["reason"] = f"quantization failed: {first_line}"
        log.debug("quantization failed", exc_info=True)
    finally:
        staged.unlink(missing_ok=True)
    record["seconds"] = round(time.monotonic() - started, 1)
    manifest.int8 = record
    kennel_artifact.write_manifest(model_dir, manifest)
    return record


def describe(record: dict[str, Any]) -> str:
    """The log line of a decision."""
    figures = ""
    if "int8_top1" in record:
        figures = (f" fp32_top1={record['fp32_top1']:.4f} int8_top1={record['int8_top1']:.4f} "
                   f"agreement={record['agreement']:.4f} validation_images={record['validation_images']} "
                   f"calibration_images={record['calibration_images']}")
    seconds = f" seconds={record['seconds']}" if "seconds" in record else ""
    verdict = "shipped" if record["shipped"] else "not shipped"
    return f"int8 {verdict}:{figures}{seconds} ({record['reason']})"
