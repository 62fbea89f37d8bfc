"""The MMS handler module (default_service_handler in MMS's configuration).

Works around (multi-model-server 1.1.11, sagemaker-inference 1.10.1):

- MMS's loader (model_loader.ModelLoader.list_model_services) takes a handler module
  only if it defines exactly one class: this module defines HandlerService and nothing
  else.
- The toolkit's DefaultHandlerService builds a plain Transformer; HandlerService gives
  it KennelTransformer (transformer.py) and kennel's request path (request_path.py).
- With preload_model (which the launcher sets) MMS creates HandlerService and calls
  initialize once, in its backend server process, then forks a worker process for each
  worker the frontend connects. An ONNX Runtime session made before a fork is broken in
  the child (its thread pool does not exist there). So initialize in the server process
  only imports (sagemaker-inference, ONNX Runtime, numpy, Pillow: about a second and
  tens of MB, then shared by every worker), and each forked worker loads the model and
  runs its warm-up inference right after the fork, before it answers MMS's load request.
- MMS swallows an exception from initialize (model_loader.MmsModelLoader.load logs it),
  reports the worker as loaded, and the toolkit then calls initialize again on every
  request (each one a 500). Here a worker that cannot load the model writes the reason
  for the launcher (activity.report_failure; the launcher then stops the container with
  that one line) and exits, so the MMS /ping plugin never counts it as loaded.

Proved by: tests/unit/test_serve_launcher.py::test_the_handler_module_is_one_class_as_mms_requires,
tests/contract/test_serve_lifecycle.py::test_ping_is_200_only_after_a_worker_loaded_and_warmed_up,
tests/contract/test_serve_lifecycle.py::test_a_worker_that_cannot_load_the_model_stops_serve,
tests/contract/test_serve_lifecycle.py::test_workers_also_load_without_mms_preload.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from typing import Any

from sagemaker_inference.default_handler_service import DefaultHandlerService

from kennel_serve.mms_toolkit import activity
from kennel_serve.mms_toolkit.multi_model_transformer import MultiModelTransformer
from kennel_serve.mms_toolkit.transformer import KennelTransformer
from kennel_serve.request_path import KennelInferenceHandler
from kennel_serve.settings import ServeSettings

log = logging.getLogger(__name__)


class HandlerService(DefaultHandlerService):
    def __init__(self) -> None:
        self.settings = ServeSettings.from_env(os.environ)
        handlers = KennelInferenceHandler(self.settings)
        if self.settings.multi_model:  # models come through the /models routes (multi_model_transformer.py)
            transformer = MultiModelTransformer(handlers, self.settings, os.environ.get("KENNEL_MME_SECRET", ""))
        else:
            transformer = KennelTransformer(handlers, self.settings)
        super().__init__(transformer=transformer)

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
