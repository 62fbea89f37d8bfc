"""AWS Lambda function in front of the kennel SageMaker endpoint.

    handler: kennel_lambda.handler        runtime: python3.11 or later (boto3 is built in)
    environment: ENDPOINT_NAME (required), the endpoint to invoke
                 DEFAULT_TARGET_MODEL (optional), for a multi-model endpoint: the model
                 asked when the caller names none (a caller's "model" wins)

Events are described in kennel_lambda_events. Every answer, error or not, is
``{"statusCode", "headers", "body"}`` with a JSON body, which is also what API
Gateway and Function URLs expect:

    200  the endpoint's answer unchanged: [[score_0, ..., score_132]] (raw class
         scores, as the original function returned), or the top-k breeds when
         the caller asked for top_k
    400/405/413/415  the event cannot be sent (the body says why); 400 also when a
         multi-model endpoint gets no model to ask, or a single-model one is named one
    404  the multi-model endpoint has no model of the name the caller gave
    4xx  the model rejected the image: its own status and message
    500  the function is misconfigured (ENDPOINT_NAME unset, DEFAULT_TARGET_MODEL
         invalid or not on the endpoint, no permission)
    502  the endpoint failed, answered something that is not JSON, or does not exist
    503  the endpoint is throttling or not ready (Retry-After is set)
    504  the endpoint did not answer within the function's time

Nothing is raised to the runtime: an unexpected failure is logged with its
traceback and answered 500. A caller's event never gets there: whatever it
holds, kennel_lambda_events refuses it with a 4xx and the log has no traceback.

Locally (no AWS): point the client at a SageMaker-runtime-compatible server with
AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME (kennel-local-runtime (kennel_ops/local_runtime.py) forwards to a
serving container), set dummy credentials and a region, and call handler().
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import botocore.session
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                 ConnectTimeoutError, NoCredentialsError, NoRegionError, ParamValidationError,
                                 ReadTimeoutError)

from kennel_lambda_events import JSON, TARGET_MODEL, TARGET_MODEL_RULE, BadRequest, EndpointRequest, parse_event

ENDPOINT_ENV = "ENDPOINT_NAME"
TARGET_MODEL_ENV = "DEFAULT_TARGET_MODEL"
_ENDPOINT_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
# Without a Lambda context (local runs, tests) requests get this much time.
LOCAL_BUDGET_S = 30.0
# SageMaker gives the container 60 s per invocation; waiting longer gains nothing.
MAX_READ_TIMEOUT_S = 65.0
MAX_CONNECT_TIMEOUT_S = 2.0
# An attempt is only worth making with at least this long to read the answer.
MIN_READ_TIMEOUT_S = 1.0
MAX_ATTEMPTS = 3
RETRY_AFTER_S = "1"
# Error codes that mean "busy, try again": answered 503 with Retry-After.
THROTTLING_CODES = frozenset({"ThrottlingException", "Throttling", "TooManyRequestsException",
                              "ModelNotReadyException", "ServiceUnavailable"})

log = logging.getLogger("kennel_lambda")
log.setLevel(logging.INFO)


class ConfigurationError(RuntimeError):
    """The function itself is set up wrongly: answered 500, the message says what to fix."""


class DeadlineReached(RuntimeError):
    """A retry would run past the function's own timeout."""


@dataclass(frozen=True)
class TimeoutPlan:
    """Connect/read timeouts and attempts whose worst case fits in the budget.

    The worst case of n attempts is n * (connect + read) plus botocore's
    standard-mode backoff for throttling, at most 2**(n-1) - 1 seconds in all.
    """

    connect_s: float
    read_s: float
    attempts: int

    @classmethod
    def for_budget(cls, budget_s: float) -> "TimeoutPlan":
        connect = min(MAX_CONNECT_TIMEOUT_S, max(0.1, budget_s / 10))
        for attempts in range(MAX_ATTEMPTS, 0, -1):
            backoff = 2 ** (attempts - 1) - 1
            read = min(MAX_READ_TIMEOUT_S, (budget_s - backoff) / attempts - connect)
            if read >= MIN_READ_TIMEOUT_S:
                return cls(connect, math.floor(read * 1000) / 1000, attempts)
        # Less than a second or two: one attempt with whatever time there is.
        return cls(connect, math.floor(max(0.1, budget_s - connect) * 1000) / 1000, 1)

    @property
    def attempt_s(self) -> float:
        return self.connect_s + self.read_s


def budget_seconds(context: Any) -> float:
    """Time this invocation may spend on the endpoint: the function's remaining
    time less a margin to build and return the answer."""
    remaining_ms = getattr(context, "get_remaining_time_in_millis", None)
    remaining = remaining_ms() / 1000.0 if callable(remaining_ms) else LOCAL_BUDGET_S
    margin = min(1.0, max(0.2, remaining * 0.1))
    return max(0.1, remaining - margin)


# One botocore session per execution environment. The client is created at the
# first invocation, when the function's time limit is known, and then reused.
_session = botocore.session.get_session()


def _load_client_data() -> None:
    """Load what creating a client reads from disk (service model, endpoint rules,
    partitions) while the module is imported: Lambda's init phase, which runs with
    a CPU boost and, under provisioned concurrency, before any request. The
    client made here is thrown away; explicit dummy credentials keep the lookup
    of real ones (and any network call) out of it."""
    try:
        _session.create_client("sagemaker-runtime", region_name="us-east-1",
                               aws_access_key_id="init", aws_secret_access_key="init")
    except Exception:  # only an optimisation: the first call then loads the data itself
        log.warning("client data not preloaded", exc_info=True)


_load_client_data()
_client: Any = None
_plan: TimeoutPlan | None = None
_deadline = math.inf  # time.monotonic() by which the current invocation must have answered
_last_error_code = ""  # error code of the current invocation's latest failed attempt


def runtime_client(budget_s: float) -> Any:
    """The sagemaker-runtime client of this execution environment."""
    global _client, _plan
    if _client is None:
        plan = TimeoutPlan.for_budget(budget_s)
        config = Config(connect_timeout=plan.connect_s, read_timeout=plan.read_s,
                        retries={"mode": "standard", "total_max_attempts": plan.attempts},
                        user_agent_extra="kennel-lambda")
        try:
            client = _session.create_client("sagemaker-runtime", config=config)
        except NoRegionError:
            raise ConfigurationError("no AWS region: set AWS_REGION (the Lambda runtime sets it)") from None
        client.meta.events.register("before-send.sagemaker-runtime.InvokeEndpoint", _refuse_late_retry)
        client.meta.events.register("response-received.sagemaker-runtime.InvokeEndpoint", _note_failure)
        _client, _plan = client, plan
        log.info("sagemaker-runtime client: connect %.1fs read %.1fs attempts %d",
                 plan.connect_s, plan.read_s, plan.attempts)
    return _client


def _refuse_late_retry(request: Any, **_: Any) -> None:
    """Stop a retry whose worst case would outlive the function (the first attempt always goes)."""
    # botocore numbers its attempts in this header: "attempt=2; max=3".
    header = request.headers.get("amz-sdk-request", b"")
    if isinstance(header, bytes):
        header = header.decode("ascii", "replace")
    attempt = re.search(r"attempt=(\d+)", header)
    retry = attempt is not None and int(attempt.group(1)) > 1
    if retry and _plan is not None and time.monotonic() + _plan.attempt_s > _deadline:
        raise DeadlineReached("no time left for another attempt")


def _note_failure(parsed_response: Any = None, exception: Any = None, **_: Any) -> None:
    """Remember why the latest attempt failed, for the answer when no retry is left."""
    global _last_error_code
    if isinstance(exception, DeadlineReached):
        return  # the refused retry itself: keep the failure that asked for it
    if exception is not None:
        _last_error_code = type(exception).__name__
    elif isinstance(parsed_response, dict) and "Error" in parsed_response:
        _last_error_code = parsed_response["Error"].get("Code", "")


def handler(event: Any, context: Any = None) -> dict[str, Any]:
    """Lambda entry point: never raises, always answers {"statusCode", "headers", "body"}."""
    global _deadline, _last_error_code
    started = time.monotonic()
    budget = budget_seconds(context)
    _deadline, _last_error_code = started + budget, ""
    source, target = "?", None
    try:
        endpoint, default_target = endpoint_name(), default_target_model()
        request = parse_event(event)
        source = request.source
        target = request.target_model or default_target
        response = invoke(runtime_client(budget), endpoint, request, target)
    except BadRequest as exc:
        response = answer(exc.status, {"error": str(exc)})
    except ConfigurationError as exc:
        log.error("configuration: %s", exc)
        response = answer(500, {"error": f"the function is misconfigured: {exc}"})
    except Exception:  # never a traceback to the caller, never an unhandled error in the runtime
        log.exception("unexpected failure")
        response = answer(500, {"error": "internal error in the function"})
    finally:
        _deadline = math.inf
    line = {"source": source, "status": response["statusCode"], "ms": round((time.monotonic() - started) * 1000, 1)}
    if target:
        line["model"] = target
    log.info(json.dumps(line))
    return response


def endpoint_name() -> str:
    name = os.environ.get(ENDPOINT_ENV, "").strip()
    if not name:
        raise ConfigurationError(f"set {ENDPOINT_ENV} to the SageMaker endpoint's name")
    if not _ENDPOINT_NAME.match(name):
        raise ConfigurationError(f"{ENDPOINT_ENV}={name!r} is not a SageMaker endpoint name")
    return name


def default_target_model() -> str | None:
    """DEFAULT_TARGET_MODEL: the model a multi-model endpoint is asked when the caller names none."""
    name = os.environ.get(TARGET_MODEL_ENV, "").strip()
    if name and not TARGET_MODEL.fullmatch(name):
        raise ConfigurationError(f"{TARGET_MODEL_ENV}={name[:100]!r} is not a model name: {TARGET_MODEL_RULE}")
    return name or None


def invoke(client: Any, endpoint: str, request: EndpointRequest, target: str | None = None) -> dict[str, Any]:
    """InvokeEndpoint (of model `target` on a multi-model endpoint), its answer or failure as the
    function's response."""
    params: dict[str, Any] = {"EndpointName": endpoint, "Body": request.body,
                              "ContentType": request.content_type, "Accept": JSON}
    if request.top_k is not None:
        params["CustomAttributes"] = f"top_k={request.top_k}"
    if target:
        params["TargetModel"] = target
    try:
        result = client.invoke_endpoint(**params)
        body = result["Body"].read()
    except ClientError as exc:
        return client_error_answer(exc, endpoint, target, named_by_caller=request.target_model is not None)
    except DeadlineReached:
        if _last_error_code in THROTTLING_CODES:
            return busy_answer()
        return answer(504, {"error": "the endpoint did not answer in time"})
    except (ConnectTimeoutError, ReadTimeoutError):
        return answer(504, {"error": "the endpoint did not answer in time"})
    except NoCredentialsError:
        raise ConfigurationError("no AWS credentials (the function's role provides them)") from None
    except ParamValidationError:
        raise  # parse_event let through what InvokeEndpoint refuses: a bug here, not an unreachable runtime
    except (BotoConnectionError, BotoCoreError) as exc:
        log.warning("runtime unreachable: %s", exc)
        return answer(502, {"error": "the SageMaker runtime could not be reached"})
    try:
        text = body.decode("utf-8")
        json.loads(text)
    except (ValueError, RecursionError):
        log.warning("endpoint answered %d bytes of %s that are not JSON", len(body), result.get("ContentType"))
        return answer(502, {"error": "the endpoint's answer is not JSON"})
    return {"statusCode": 200, "headers": {"Content-Type": JSON}, "body": text}


def client_error_answer(exc: ClientError, endpoint: str, target: str | None = None,
                        named_by_caller: bool = False) -> dict[str, Any]:
    """botocore's error for InvokeEndpoint -> the function's answer."""
    error = exc.response.get("Error", {})
    code = error.get("Code", "")
    message = error.get("Message", "")
    http_status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    log.warning("InvokeEndpoint failed: %s (%s): %.500s", code, http_status, message)
    if code == "ModelError":
        return model_error_answer(exc.response)
    if code in THROTTLING_CODES or http_status in (429, 503):
        return busy_answer()
    if code == "ValidationError":
        refused = target_model_answer(message, target, named_by_caller)
        if refused is not None:
            return refused
    if code == "ValidationError" and "not found" in message.lower():
        return answer(502, {"error": f"the endpoint {endpoint} does not exist in this account and region"})
    if code in ("AccessDeniedException", "AccessDenied", "UnrecognizedClientException",
                "InvalidSignatureException", "ExpiredTokenException", "MissingAuthenticationTokenException"):
        raise ConfigurationError(f"the function's role may not invoke the endpoint ({code})")
    if code in ("RequestTimeout", "RequestTimeoutException"):
        return answer(504, {"error": "the endpoint did not answer in time"})
    return answer(502, {"error": f"the endpoint failed ({code or http_status})"})


def target_model_answer(message: str, target: str | None, named_by_caller: bool) -> dict[str, Any] | None:
    """The runtime's refusals about the target model (ValidationError), or None for another.

    A multi-model endpoint asked without a model, or a single-model one asked for one, is the
    caller's to fix (400) unless the model came from DEFAULT_TARGET_MODEL (the function's own
    setting: 500); likewise a model the endpoint cannot load, which the runtime names in its
    message (404: no such object under the prefix, or one the endpoint's role may not read).
    """
    text = message.lower()
    if target is None and "target model" in text:
        return answer(400, {"error": "the endpoint serves several models: name one with \"model\" "
                                     "(such as rex.tar.gz)"})
    if target is not None and "not a multi-model endpoint" in text:
        if not named_by_caller:
            raise ConfigurationError(f"{TARGET_MODEL_ENV} is set, but the endpoint serves one model")
        return answer(400, {"error": "the endpoint serves one model: leave out \"model\""})
    if target is not None and target in message:
        if not named_by_caller:
            raise ConfigurationError(f"{TARGET_MODEL_ENV}={target} is not a model the endpoint can load")
        return answer(404, {"error": f"the endpoint has no model {target} that it can load"})
    return None


def model_error_answer(response: dict[str, Any]) -> dict[str, Any]:
    """The container's own non-2xx answer: its 4xx passed on with its message, 429/503 as busy,
    anything else 502 (504 when the runtime gave up waiting for it)."""
    status = response.get("OriginalStatusCode")
    original = response.get("OriginalMessage") or ""
    message = response.get("Error", {}).get("Message", "")
    if status in (429, 503):  # the model server is overloaded (e.g. every worker busy): a retry may succeed
        return busy_answer()
    if isinstance(status, int) and 400 <= status < 500:
        return answer(status, {"error": model_message(original) or f"the model rejected the request ({status})"})
    if "timed out" in (message + original).lower():
        return answer(504, {"error": "the model did not answer in time"})
    return answer(502, {"error": f"the model failed ({status or 'no status'})"})


def model_message(original: str) -> str:
    """The container's error text: the "error"/"message" of a JSON body, else the text itself, short."""
    text = original.strip()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        for key in ("error", "message", "Message"):
            if isinstance(data.get(key), str):
                text = data[key]
                break
    return text[:500]


def busy_answer() -> dict[str, Any]:
    return answer(503, {"error": "the endpoint is busy or not ready: retry shortly"}, {"Retry-After": RETRY_AFTER_S})


def answer(status: int, body: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {"statusCode": status, "headers": {"Content-Type": JSON, **(headers or {})}, "body": json.dumps(body)}
