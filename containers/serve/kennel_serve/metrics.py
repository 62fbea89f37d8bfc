"""Per-request stage timings, the request's log line, and the counts a worker keeps.

A model worker handles one request at a time, from start to answer, in its own
process. While it does, ``clock`` holds the request's StageClock, and each stage of
the request path runs inside ``stage(name)``: the time of a stage nested in another
(fetch and preprocess run inside decode) counts for the inner one only, so the
stages add up to the worker's time. Outside a request (the launcher's model check,
the benchmarks in process) ``stage`` measures nothing.

After each request the worker (mms_toolkit/transformer.py):

- prints one JSON line (``request_line``): the request id, status, the stage times,
  the bytes, the model; never the payload. With EMF on, the same line carries the
  ``_aws`` key that makes CloudWatch read its numbers as metrics (Embedded Metric
  Format); the dimensions are the model name and the status class only, so the
  number of metrics is bounded whatever the traffic.
- adds the request to its WorkerCounts and writes them to ``metrics/<pid>.counts`` in
  the state dir (CountsFile). metrics_endpoint.py sums every worker's file into
  Prometheus text.

The file is rewritten in place, one pwrite on a descriptor the worker keeps open:
a few microseconds. Replacing it (a new file renamed over the old) cost a
millisecond or more per request on ext4 and overlayfs, which flush a file renamed
over another (docs/benchmarks.md, "Metrics and logging overhead"). A reader may
catch a write half done, so each write carries the CRC-32 of its JSON, and a
reader that finds a mismatch reads again.

Proved by: tests/unit/test_serve_metrics.py,
tests/contract/test_serve_observability.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

# The stages of the request path, in order (docs/serving.md, Observability).
# read: screening the body and headers, the toolkit's dispatch, an error's answer:
# whatever the worker does outside the others.
STAGES = ("read", "fetch", "decode", "preprocess", "forward", "render")
# Histogram upper bounds, seconds: a millisecond up to the 60 s request timeout.
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
METRICS_DIR = "metrics"
COUNTS_SUFFIX = ".counts"
EMF_NAMESPACE = "kennel/Endpoint"
# The EMF metric of each stage (milliseconds), as the line carries it.
STAGE_METRICS = {stage: f"{stage.capitalize()}Time" for stage in STAGES}


class StageClock:
    """Seconds of each stage of one request, exclusive of the stages nested in it."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._open: list[list] = []  # [stage, since] of the stages running, innermost last

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._open:  # the outer stage pauses while this one runs
            outer = self._open[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._open.append([name, now])
        try:
            yield
        finally:
            end = time.perf_counter()
            inner = self._open.pop()
            self.seconds[inner[0]] += end - inner[1]
            if self._open:
                self._open[-1][1] = end


clock: StageClock | None = None  # the request this worker handles now, when measured


@contextlib.contextmanager
def _unmeasured() -> Iterator[None]:
    yield


def stage(name: str):
    """Time a stage of the current request (nothing outside one)."""
    return clock.stage(name) if clock is not None else _unmeasured()


def status_class(status: int) -> str:
    return f"{status // 100}xx"


@dataclass
class Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS_S))  # not cumulative
    sum: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        for index, bound in enumerate(BUCKETS_S):
            if seconds <= bound:
                self.buckets[index] += 1
                break
        self.sum += seconds
        self.count += 1  # count - sum(buckets): the answers over the last bound (+Inf)


@dataclass
class WorkerCounts:
    """What one worker has answered since it started; written whole after each request."""

    answers: dict[str, int] = field(default_factory=dict)  # by status class
    worker: Histogram = field(default_factory=Histogram)
    stages: dict[str, Histogram] = field(default_factory=lambda: {s: Histogram() for s in STAGES})
    received_bytes: int = 0
    sent_bytes: int = 0

    def add(self, status: int, worker_s: float, stages_s: dict[str, float], received: int, sent: int) -> None:
        key = status_class(status)
        self.answers[key] = self.answers.get(key, 0) + 1
        self.worker.observe(worker_s)
        for name, seconds in stages_s.items():
            self.stages[name].observe(seconds)
        self.received_bytes += received
        self.sent_bytes += sent

    def to_json(self) -> dict:
        return {"answers": self.answers, "worker": vars(self.worker),
                "stages": {name: vars(h) for name, h in self.stages.items()},
                "received_bytes": self.received_bytes, "sent_bytes": self.sent_bytes}

    @classmethod
    def from_json(cls, data: dict) -> "WorkerCounts":
        return cls(answers={str(k): int(v) for k, v in data["answers"].items()},
                   worker=Histogram(**data["worker"]),
                   stages={name: Histogram(**data["stages"][name]) for name in STAGES},
                   received_bytes=int(data["received_bytes"]), sent_bytes=int(data["sent_bytes"]))

    def merge(self, other: "WorkerCounts") -> None:
        for key, count in other.answers.items():
            self.answers[key] = self.answers.get(key, 0) + count
        for mine, theirs in [(self.worker, other.worker)] + [(self.stages[s], other.stages[s]) for s in STAGES]:
            mine.buckets = [a + b for a, b in zip(mine.buckets, theirs.buckets)]
            mine.sum += theirs.sum
            mine.count += theirs.count
        self.received_bytes += other.received_bytes
        self.sent_bytes += other.sent_bytes


class CountsFile:
    """This worker's ``metrics/<pid>.counts``: "<crc32 of the JSON, 8 hex digits> <JSON>", space-padded.

    Written in place (see the module's docstring); the padding covers whatever a
    longer previous write left. Best effort: a request never fails for it.
    """

    def __init__(self, state_dir: Path):
        self._dir = Path(state_dir) / METRICS_DIR
        self._pid: int | None = None
        self._fd: int | None = None
        self._length = 0  # of the longest write so far

    def _descriptor(self) -> int | None:
        if self._pid != os.getpid():  # MMS forks workers: each writes its own file
            self._pid, self._fd, self._length = os.getpid(), None, 0
            with contextlib.suppress(OSError):
                self._dir.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self._dir / f"{self._pid}{COUNTS_SUFFIX}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                   0o644)
        return self._fd

    def write(self, counts: WorkerCounts) -> None:
        fd = self._descriptor()
        if fd is None:
            return
        body = json.dumps(counts.to_json(), separators=(",", ":")).encode()
        record = b"%08x %s" % (zlib.crc32(body), body)
        length = len(record)
        with contextlib.suppress(OSError):
            os.pwrite(fd, record.ljust(self._length), 0)
            self._length = max(self._length, length)


def read_counts(path: Path, attempts: int = 5) -> WorkerCounts:
    """One worker's counts; ValueError if no read in ``attempts`` found a whole write."""
    for _ in range(attempts):
        head, _, body = path.read_bytes().partition(b" ")
        body = body.rstrip(b" ")
        if len(head) == 8 and body and int(head, 16) == zlib.crc32(body):
            return WorkerCounts.from_json(json.loads(body))
    raise ValueError(f"{path} holds no whole record")


def read_all_workers(state_dir: Path) -> WorkerCounts:
    """The sum of every worker's file, those of workers that have ended too (counters never go down)."""
    total = WorkerCounts()
    for path in sorted((Path(state_dir) / METRICS_DIR).glob(f"*{COUNTS_SUFFIX}")):
        try:
            total.merge(read_counts(path))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable: skipped this once, the next scrape reads it again
    return total


def request_line(*, request_id: str, inference_id: str | None, status: int, model: str, worker_s: float,
                 stages_s: dict[str, float], received: int, sent: int, emf: bool) -> str:
    """The request's one JSON log line; with emf, also a CloudWatch Embedded Metric Format record."""
    line = {"request_id": request_id}  # first: the MMS log configuration routes lines by this start
    if inference_id:
        line["inference_id"] = inference_id
    line.update({"status": status, "StatusClass": status_class(status), "Model": model, "Requests": 1,
                 "WorkerTime": round(worker_s * 1000, 3)})
    line.update({STAGE_METRICS[name]: round(seconds * 1000, 3) for name, seconds in stages_s.items()})
    line.update({"RequestBytes": received, "ResponseBytes": sent})
    if emf:
        milliseconds = [{"Name": name, "Unit": "Milliseconds"}
                        for name in ["WorkerTime", *STAGE_METRICS.values()]]
        line["_aws"] = {"Timestamp": int(time.time() * 1000), "CloudWatchMetrics": [
            {"Namespace": EMF_NAMESPACE, "Dimensions": [["Model"]],
             "Metrics": milliseconds + [{"Name": "RequestBytes", "Unit": "Bytes"},
                                        {"Name": "ResponseBytes", "Unit": "Bytes"}]},
            {"Namespace": EMF_NAMESPACE, "Dimensions": [["Model"], ["Model", "StatusClass"]],
             "Metrics": [{"Name": "Requests", "Unit": "Count"}]},
        ]}
    return json.dumps(line, separators=(",", ":"))
