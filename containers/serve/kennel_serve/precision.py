"""Which graph serves: FP32 (model.onnx) or INT8 (model.int8.onnx), by KENNEL_PRECISION.

``fp32`` and ``int8`` pin it (a model without an INT8 graph serves FP32 either
way). ``auto`` measures both graphs on this CPU at start-up and keeps INT8 only
when it runs a single image at least INT8_MIN_SPEEDUP times as fast: on CPUs
without VNNI or AMX an INT8 graph can run slower than FP32, and INT8 changes the
scores a little, which only a clear gain pays for.

Every worker of a server serves the same graph: the first worker to get here
decides (it measures, for ``auto``), writes the choice into the state dir and logs
it once; the others read it. Measuring once also keeps the measurement from
competing with other workers measuring at the same time.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "int8")
# A median of MEASURED_RUNS on a host shared with other work wanders by about 10 %;
# at 1.2 x an INT8 choice saves at least a sixth of the instances, which pays for
# the small difference in scores. Below it FP32 is kept.
INT8_MIN_SPEEDUP = 1.2
WARM_RUNS = 2  # the first runs of a session allocate and pick kernels: not timed
MEASURED_RUNS = 7
HEADER = "X-Kennel-Precision"


@dataclass(frozen=True)
class Choice:
    precision: str  # "fp32" or "int8": the graph that serves
    setting: str  # KENNEL_PRECISION
    reason: str
    speedup: float | None = None  # FP32 seconds / INT8 seconds for one image, when measured

    def header(self) -> str:
        """The X-Kennel-Precision value: 'int8; setting=auto; speedup=2.41'."""
        value = f"{self.precision}; setting={self.setting}"
        return value + (f"; speedup={self.speedup:.2f}" if self.speedup is not None else "")

    def describe(self) -> str:
        return f"serving the {self.precision.upper()} graph (KENNEL_PRECISION={self.setting}: {self.reason})"


def median_seconds(run: Callable[[], object]) -> float:
    for _ in range(WARM_RUNS):
        run()
    times = []
    for _ in range(MEASURED_RUNS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(run_fp32: Callable[[], object], run_int8: Callable[[], object]) -> float:
    """FP32 seconds / INT8 seconds, medians of MEASURED_RUNS each."""
    fp32 = median_seconds(run_fp32)
    int8 = median_seconds(run_int8)
    return fp32 / int8 if int8 > 0 else float("inf")


def decide(setting: str, has_int8: bool, int8_record: dict | None,
           speedup: Callable[[], float]) -> Choice:
    """The choice for this model and setting; ``speedup`` is called only for ``auto`` with an INT8 graph."""
    if not has_int8:
        why = (int8_record or {}).get("reason")
        return Choice("fp32", setting, f"the model has no INT8 graph ({why})" if why else "the model has no INT8 graph")
    if setting == "fp32":
        return Choice("fp32", setting, "pinned")
    if setting == "int8":
        return Choice("int8", setting, "pinned")
    ratio = speedup()
    if ratio >= INT8_MIN_SPEEDUP:
        return Choice("int8", setting, f"INT8 runs one image {ratio:.2f} x as fast as FP32 on this CPU, "
                                       f"at least {INT8_MIN_SPEEDUP} x", ratio)
    return Choice("fp32", setting, f"INT8 runs one image only {ratio:.2f} x as fast as FP32 on this CPU, "
                                   f"below {INT8_MIN_SPEEDUP} x", ratio)


def shared_choice(state_dir: Path | None, key: str, make: Callable[[], Choice]) -> Choice:
    """The server's one choice: made (and logged) by the first worker, read by the others.

    ``key`` names this server and model (a restarted server or another model decides anew).
    """
    if state_dir is None:
        choice = make()
        log.info("%s", choice.describe())
        return choice
    state_dir.mkdir(parents=True, exist_ok=True)
    record = state_dir / f"precision-{key}.json"
    with open(state_dir / "precision.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this worker dies
        try:
            return Choice(**json.loads(record.read_text()))
        except (OSError, ValueError, TypeError):
            pass
        choice = make()
        staged = record.with_suffix(f".{os.getpid()}.tmp")
        staged.write_text(json.dumps(asdict(choice)))
        os.replace(staged, record)
        log.info("%s", choice.describe())
        return choice


def synthetic_batch(height: int, width: int) -> np.ndarray:
    """One image's worth of model input with image-like statistics (a timing input only)."""
    return np.random.default_rng(0).standard_normal((1, 3, height, width)).astype(np.float32)
