"""The MMS handler module (default_service_handler): exactly one class, as MMS requires.

Each MMS worker process instantiates HandlerService, calls initialize once (model_fn
and one warm-up inference) and handle for every request.

MMS swallows an exception from initialize, reports the worker as loaded and calls
initialize again on every request (each one a 500). Here a failed initialize
writes its reason for the launcher (which then stops the container with that one
line) and ends the worker process, so the MMS /ping plugin never counts it as loaded.
"""
from __future__ import annotations

import logging
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
        try:
            super().initialize(context)
        except Exception as exc:  # anything model_fn or the warm-up raises
            line = f"worker {os.getpid()} could not load the model: {' '.join(str(exc).split()) or type(exc).__name__}"
            log.exception(line)
            activity.report_failure(self.settings.state_dir, line)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # at once: raising would only reach MMS's loader, which logs and carries on
