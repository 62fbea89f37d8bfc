"""Log output: plain lines for logs and SageMaker, and a progress bar when a person watches a terminal.

Every line goes through the ``kennel_train`` logger to stdout (no prefix: the
metric lines must keep the exact format the MetricDefinitions match). Progress
lines come every ``interval`` steps and at the end of each pass, with images/s
and an ETA; when stdout is a TTY a one-line bar is redrawn after every step and
cleared before any log line, so the two never mix.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, TextIO

log = logging.getLogger("kennel_train")


class _BarAwareHandler(logging.StreamHandler):
    """Clears the progress bar before a log line and redraws it after."""

    bar: "ProgressBar | None" = None

    def emit(self, record: logging.LogRecord) -> None:
        bar = self.bar
        if bar is not None:
            bar.clear()
        super().emit(record)
        if bar is not None:
            bar.redraw()


_handler: _BarAwareHandler | None = None


def configure_logging(stream: TextIO | None = None) -> None:
    """Plain lines on stdout, flushed at once; idempotent (main() may run more than once in a process)."""
    global _handler
    if _handler is not None:
        log.removeHandler(_handler)
    _handler = _BarAwareHandler(stream or sys.stdout)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the toolkit's root handler would add its own prefix and a second copy


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """``[#######.......]  40/105  45.1 img/s  eta 0:01:12`` redrawn in place on a TTY."""

    WIDTH = 24

    def __init__(self, stream: TextIO, label: str, total: int):
        self.stream, self.label, self.total = stream, label, total
        self.text = ""

    def update(self, done: int, rate: float, eta: float) -> None:
        filled = int(self.WIDTH * done / self.total) if self.total else self.WIDTH
        self.text = (f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total} "
                     f"{rate:.1f} img/s eta {format_duration(eta)}")
        self.redraw()

    def redraw(self) -> None:
        if self.text:
            self.stream.write("\r" + self.text + "\x1b[K")
            self.stream.flush()

    def clear(self) -> None:
        if self.text:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class Progress:
    """Throughput and ETA of one pass (train, valid or test) over a loader."""

    def __init__(self, phase: str, epoch: int, epochs: int, total_steps: int, interval: int,
                 stream: TextIO | None = None):
        self.phase, self.epoch, self.epochs = phase, epoch, epochs
        self.total_steps, self.interval = total_steps, interval
        self.images = 0
        self.started = time.monotonic()
        stream = stream or sys.stdout
        self.bar = ProgressBar(stream, f"{phase} {epoch}/{epochs}", total_steps) if stream.isatty() else None
        if _handler is not None:
            _handler.bar = self.bar

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.images / elapsed if elapsed > 0 else 0.0

    def eta(self, step: int) -> float:
        elapsed = time.monotonic() - self.started
        return elapsed / step * (self.total_steps - step) if step else 0.0

    def step(self, step: int, images: int, running_loss: Callable[[], float] | None = None) -> None:
        """After each step; ``running_loss`` is called only when a line is due (it may sync a GPU)."""
        self.images += images
        if self.bar is not None:
            self.bar.update(step, self.rate, self.eta(step))
        if step % self.interval == 0 and step < self.total_steps:
            loss = f" running_loss={running_loss():.4f}" if running_loss is not None else ""
            log.info("progress %s epoch=%d/%d step=%d/%d images_per_second=%.1f eta=%s%s", self.phase,
                     self.epoch, self.epochs, step, self.total_steps, self.rate, format_duration(self.eta(step)),
                     loss)

    def finish(self) -> None:
        """Clear the bar and log the pass's throughput."""
        if self.bar is not None:
            self.bar.clear()
        if _handler is not None:
            _handler.bar = None
        log.info("progress %s epoch=%d/%d done images=%d seconds=%.1f images_per_second=%.1f", self.phase,
                 self.epoch, self.epochs, self.images, time.monotonic() - self.started, self.rate)
