"""The loaded model: the artifact's manifest plus an ONNX Runtime session.

No torch here: the artifact's model.onnx (or model.int8.onnx, as KENNEL_PRECISION
and precision.py choose) runs on ONNX Runtime, and its preprocessing is the
manifest's Preprocessing.apply, the same function training evaluated with.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

# ONNX Runtime 1.32 reports usage to Microsoft's event collector from every process
# (a DNS lookup at the first session, an HTTPS upload later) unless this is set before
# it is imported. An endpoint must not talk to anyone but its clients.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from PIL import Image  # noqa: E402

import kennel_artifact  # noqa: E402
from kennel_artifact import ArtifactError, Manifest  # noqa: E402

from kennel_serve import precision  # noqa: E402

log = logging.getLogger(__name__)

# Errors only: ORT's warnings about graph rewrites are noise in a serving log, and a
# failed load is reported once, by ArtifactError.
ort.set_default_logger_severity(3)

# ONNX Runtime's arena grows to the largest batch it has run and keeps that memory:
# a ResNet-50 run of 32 images holds about 190 MiB more than one of 8 (docs/benchmarks.md,
# "Request budget"). On a CPU, batches beyond a few images gain no throughput.
FORWARD_BATCH = 8

_GRAPH_FILES = {"fp32": kennel_artifact.ONNX_FILE, "int8": kennel_artifact.INT8_FILE}


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # One operator at a time: a CNN is a chain; parallelism lives inside each operator.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ALL: includes the CPU layout transforms (NCHWc), about 1.4x faster than EXTENDED for ResNet-50.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No busy-waiting pool threads: no faster on an idle machine (measured), and on a
    # busy one a spinning thread only steals the CPU the thread it waits for needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def providers() -> list[str]:
    """CUDA when the installed ONNX Runtime has it (a GPU build of the image), else CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _open(onnx_path: Path, threads: int) -> ort.InferenceSession:
    return open_session(onnx_path, session_options(threads))


def open_session(onnx_path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=providers())
    except Exception as exc:  # ORT raises its own exception types for every way a file can be bad
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{onnx_path} cannot be loaded by ONNX Runtime: {reason}") from None


def run_batched(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    """``run`` over float32 [N, 3, H, W], FORWARD_BATCH images at a time, the results concatenated."""
    if len(batch) <= FORWARD_BATCH:
        return run(batch)
    return np.concatenate([run(batch[start:start + FORWARD_BATCH]) for start in range(0, len(batch), FORWARD_BATCH)])


class KennelModel:
    """What model_fn returns: predict(images) -> logits [N, num_classes] in class order.

    ``session`` runs a request while other workers are busy too; ``solo_session``
    (more threads) runs it when ``others_busy()`` says every other worker is idle,
    so a lone request gets all the CPUs and a full server one CPU per worker.
    """

    def __init__(self, manifest: Manifest, session: ort.InferenceSession, model_dir: Path,
                 solo_session: ort.InferenceSession | None = None,
                 others_busy: Callable[[], bool] | None = None,
                 choice: precision.Choice | None = None):
        self.manifest = manifest
        self.session = session
        self.solo_session = solo_session
        self.others_busy = others_busy or (lambda: False)
        self.model_dir = model_dir
        self.precision = choice or precision.Choice("fp32", "fp32", "pinned")
        self._check_signature()

    @property
    def onnx_path(self) -> Path:
        return self.model_dir / _GRAPH_FILES[self.precision.precision]

    @classmethod
    def load(cls, model_dir: str | Path, threads: int = 1, solo_threads: int | None = None,
             others_busy: Callable[[], bool] | None = None, precision_setting: str = "fp32",
             state_dir: Path | None = None) -> "KennelModel":
        """Both sessions (``threads`` and ``solo_threads``) run the graph precision.py chooses.

        ``state_dir``: where the server's workers share that choice (None: this process alone).
        """
        model_dir = Path(model_dir)
        manifest = kennel_artifact.load(model_dir)
        opened: dict[str, ort.InferenceSession] = {}

        def session_of(graph: str) -> ort.InferenceSession:
            if graph not in opened:
                opened[graph] = _open(model_dir / _GRAPH_FILES[graph], threads)
            return opened[graph]

        def speedup() -> float:
            batch = precision.synthetic_batch(*manifest.preprocessing.input_size)
            fp32, int8 = session_of("fp32"), session_of("int8")
            return precision.measure(lambda: cls._run(fp32, batch), lambda: cls._run(int8, batch))

        # Workers of one server share a parent (MMS's backend or frontend process).
        key = f"{os.getppid()}-{(manifest.int8_sha256 or manifest.onnx_sha256 or 'unchecked')[:16]}"
        choice = precision.shared_choice(state_dir, key, lambda: precision.decide(
            precision_setting, manifest.has_int8, manifest.int8, speedup))
        session = session_of(choice.precision)
        opened.clear()  # the graph not chosen is not kept
        graph_path = model_dir / _GRAPH_FILES[choice.precision]
        solo = _open(graph_path, solo_threads) if solo_threads and solo_threads > threads else None
        return cls(manifest, session, model_dir, solo, others_busy, choice)

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        onnx_path = self.onnx_path
        if kennel_artifact.ONNX_INPUT not in inputs or kennel_artifact.ONNX_OUTPUT not in outputs:
            raise ArtifactError(f"{onnx_path} must have the input {kennel_artifact.ONNX_INPUT!r} and the output "
                                f"{kennel_artifact.ONNX_OUTPUT!r}, has {sorted(inputs)} -> {sorted(outputs)}")
        shape = inputs[kennel_artifact.ONNX_INPUT].shape
        height, width = self.manifest.preprocessing.input_size
        if len(shape) != 4 or any(isinstance(d, int) and d != want for d, want in zip(shape[1:], (3, height, width))):
            raise ArtifactError(f"{onnx_path} expects input of shape {shape}, but the manifest's preprocessing "
                                f"gives [N, 3, {height}, {width}]")
        classes = outputs[kennel_artifact.ONNX_OUTPUT].shape[-1]
        if isinstance(classes, int) and classes != self.manifest.num_classes:
            raise ArtifactError(f"{onnx_path} gives {classes} scores per image, but {kennel_artifact.MANIFEST_FILE} "
                                f"names {self.manifest.num_classes} classes")

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> float32 [N, 3, H, W], exactly training's evaluation transform."""
        return np.stack([self.manifest.preprocessing.apply(image) for image in images])

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] -> logits float32 [N, num_classes], FORWARD_BATCH images per run."""
        session = self.solo_session if self.solo_session is not None and not self.others_busy() else self.session
        return run_batched(lambda part: self._run(session, part), batch)

    @staticmethod
    def _run(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
        (logits,) = session.run([kennel_artifact.ONNX_OUTPUT],
                                {kennel_artifact.ONNX_INPUT: np.ascontiguousarray(batch, dtype=np.float32)})
        return logits

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.forward(self.preprocess(images))

    def warm_up(self) -> float:
        """One inference on a synthetic image; raises ArtifactError unless it gives sane scores.

        The first run of a session allocates its buffers and picks kernels; doing it
        here keeps that cost out of the first client's request. Returns its seconds.
        """
        height, width = self.manifest.preprocessing.input_size
        start = time.perf_counter()
        image = Image.new("RGB", (width, height), (124, 116, 104))
        batch = self.preprocess([image])
        logits = self._run(self.session, batch)
        if self.solo_session is not None:  # its first run allocates too
            solo = self._run(self.solo_session, batch)
            if not np.allclose(solo, logits, rtol=1e-3, atol=1e-4):
                raise ArtifactError("the model gives different scores with different engine thread counts")
        seconds = time.perf_counter() - start
        if logits.shape != (1, self.manifest.num_classes):
            raise ArtifactError(f"warm-up inference gave scores of shape {list(logits.shape)}, expected "
                                f"[1, {self.manifest.num_classes}]")
        if not np.all(np.isfinite(logits)):
            raise ArtifactError("warm-up inference gave scores that are not finite numbers (NaN or infinity)")
        log.info("warm-up inference (%s) took %.0f ms", self.precision.precision, seconds * 1000)
        return seconds
