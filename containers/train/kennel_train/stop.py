"""SIGTERM / SIGINT: ask the training loop to save a checkpoint and stop at the next step boundary.

SageMaker sends SIGTERM on a stop or a spot interruption and SIGKILL 120 s
later; the toolkit's ``train`` does not forward it, which is why main() runs
in the toolkit's own process and installs these handlers itself. The handler
only sets a flag: the loop checks it after every step (seconds, not minutes),
writes the checkpoint and the failure reason, and exits non-zero. A second
SIGINT (Ctrl-C twice) stops at once.
"""
from __future__ import annotations

import os
import signal
from typing import Any

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number else "no signal"

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal_number is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the person means it
        if self.signal_number is None:
            self.signal_number = signum
            # os.write, not logging: a handler may interrupt a logging call in progress.
            os.write(1, f"received {signal.Signals(signum).name}: saving a checkpoint at the next step, "
                        "then stopping\n".encode())

    def install(self) -> "StopRequest":
        for signum in _SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def reset_in_worker(_worker_id: int) -> None:
    """DataLoader worker_init_fn: forked workers must not inherit the flag-only handlers.

    SIGTERM ends a worker (the loader terminates stragglers with it at shutdown);
    SIGINT from a terminal reaches the whole process group, and the main process
    decides what it means.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
