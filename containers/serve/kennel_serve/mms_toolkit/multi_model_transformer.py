"""The worker's side of a multi-model endpoint: the jobs multi_model_routes.py sends.

Each job carries X-Kennel-Mme-Op (``load`` or ``invoke``), the model's name, its
directory and the endpoint's token for this load of it, and KENNEL_MME_SECRET, which
the launcher gave the routes and MMS's workers only. A request without it did not
come through the routes (MMS listens on loopback only) and is answered 404: models
are invoked at /models/NAME/invoke.

- ``load``: this worker loads the model (kennel_serve.multi_model), warm-up included,
  and answers 200; 400 when the model directory cannot be served, with the reason;
  507 when memory does not allow it. The other workers load it at their first
  request for it.
- ``invoke``: the model becomes the toolkit's model for this request, and the request
  runs exactly the path /invocations runs on a single-model endpoint (screening,
  decode, preprocess with this model's preprocessing, forward, render, errors).

Proved by: tests/contract/test_serve_multi_model.py, tests/unit/test_serve_multi_model_host.py.
"""
from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from sagemaker_inference import environment

from kennel_artifact import ArtifactError

from kennel_serve.mms_toolkit.errors import RequestError
from kennel_serve.mms_toolkit.transformer import KennelTransformer, request_headers
from kennel_serve.multi_model import InsufficientMemory, MultiModelHost

log = logging.getLogger(__name__)

HEADER_PREFIX = "x-kennel-mme-"
NOT_A_MODEL_ROUTE = ("this endpoint hosts several models (SAGEMAKER_MULTI_MODEL=true): invoke one at "
                     "POST /models/NAME/invoke")


@dataclass(frozen=True)
class Job:
    op: str  # "load" or "invoke"
    name: str
    url: str
    token: str


def endpoint_job(headers: dict, secret: str) -> Job | None:
    """The job multi_model_routes.py sent, or None when the request did not come from it."""
    fields = {}
    for key, value in headers.items():
        key = (key.decode("latin-1") if isinstance(key, bytes) else str(key)).lower()
        if key.startswith(HEADER_PREFIX):
            fields[key[len(HEADER_PREFIX):]] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    given = fields.get("secret", "")
    if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
        return None
    if fields.get("op") not in ("load", "invoke") or not all(fields.get(k) for k in ("model", "url", "token")):
        return None
    return Job(fields["op"], fields["model"], fields["url"], fields["token"])


class MultiModelTransformer(KennelTransformer):
    def __init__(self, default_inference_handler: Any, settings: Any, secret: str):
        super().__init__(default_inference_handler, settings)
        self._secret = secret
        self.host: MultiModelHost | None = None
        self._job: Job | None = None

    @property
    def metrics_model(self) -> str:
        """The request's line names the model invoked, not the host."""
        return self._job.name if self._job is not None else self.settings.metrics_model

    def validate_and_initialize(self, model_dir: Any = None, context: Any = None) -> None:
        """No model at start: the worker's host of models, loaded by the endpoint's jobs."""
        if not self._initialized:
            self._context = context
            self._environment = environment.Environment()
            self._validate_user_module_and_set_functions()  # the built-in handlers: no user module here
            self.host = MultiModelHost(self.settings)
            self._initialized = True

    def _transform(self, data: list, context: Any) -> list:
        job = self._job = endpoint_job(request_headers(context), self._secret)
        if job is None:
            return self.handle_error(context, RequestError(HTTPStatus.NOT_FOUND, NOT_A_MODEL_ROUTE), "")
        self._model = None
        try:
            if job.op == "load":
                self._model = self.host.load(job.name, job.url, job.token)
                context.set_response_content_type(0, "application/json")
                return [json.dumps({"status": f"model {job.name} loaded"}) + "\n"]
            self._model = self.host.get(job.name, job.url, job.token)
        except InsufficientMemory as exc:
            return self.handle_error(context, RequestError(HTTPStatus.INSUFFICIENT_STORAGE, str(exc)), "")
        except (ArtifactError, OSError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return self.handle_error(context, RequestError(HTTPStatus.BAD_REQUEST,
                                                           f"cannot load model {job.name}: {reason}"), "")
        self._default_inference_handler.preprocessing = self._model.manifest.preprocessing
        return super()._transform(data, context)
