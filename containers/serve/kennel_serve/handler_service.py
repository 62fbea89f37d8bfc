"""The MMS handler module (default_service_handler): exactly one class, as MMS requires.

MMS runs one backend server process per model, which forks a worker process for
each worker the frontend connects. The launcher sets preload_model, so MMS creates
HandlerService and calls initialize once, in that server process, before any fork:
initialize then only imports (sagemaker-inference, ONNX Runtime, numpy, Pillow:
about a second and tens of MB, then shared by every worker),
and each forked worker loads the model and runs its warm-up inference right after
the fork, before it answers MMS's load request. An ONNX Runtime session is never
created before a fork: its thread pool would not exist in the child.

MMS swallows an exception from initialize, reports the worker as loaded and calls
initialize again on every request (each one a 500). Here a worker that cannot
load the model writes the reason for the launcher (which then stops the container
with that one line) and exits, so the MMS /ping plugin never counts it as loaded.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from typing import Any

from sagemaker_inference.default_handler_service import DefaultHandlerService

from kennel_serve import activity
from kennel_serve.handler import KennelInferenceHandler
from kennel_serve.settings import ServeSettings
from kennel_serve.transformer import KennelTransformer

log = logging.getLogger(__name__)


class HandlerService(DefaultHandlerService):
    def __init__(self) -> None:
        self.settings = ServeSettings.from_env(os.environ)
        super().__init__(transformer=KennelTransformer(KennelInferenceHandler(self.settings), self.settings))

    def initialize(self, context: Any) -> None:
        if multiprocessing.parent_process() is None:
            # MMS's server process (preload_model): workers are forked from here and load then.
            import kennel_serve.engine  # noqa: F401  (ONNX Runtime, numpy: imported once, before the forks)
            server = os.getpid()

            def in_forked_worker() -> None:
                if os.getppid() == server:  # the hook is inherited by later forks: only MMS's workers load
                    self._load_model(context)

            os.register_at_fork(after_in_child=in_forked_worker)
            return
        self._load_model(context)  # a worker forked without preload (MMS_PRELOAD_MODEL=false)

    def _load_model(self, context: Any) -> None:
        try:
            super().initialize(context)  # model_fn, then the warm-up inference
        except BaseException as exc:  # anything model_fn or the warm-up raises, in a fork hook too
            line = f"worker {os.getpid()} could not load the model: {' '.join(str(exc).split()) or type(exc).__name__}"
            log.exception(line)
            activity.report_failure(self.settings.state_dir, line)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # at once: raising would only reach MMS's loader, which logs and carries on
