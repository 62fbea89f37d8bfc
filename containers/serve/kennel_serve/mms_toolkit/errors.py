"""The error type a client's mistake must have for the toolkit to answer with its status.

Works around (sagemaker-inference 1.10.1, transformer.Transformer.transform): every
exception that is not a BaseInferenceToolkitError becomes a 500 carrying str(exc),
so a 4xx has to be raised as the toolkit's own type. RequestError is that type;
inputs.py, outputs.py and url_fetch.py raise it through the constructors below, and
KennelTransformer.handle_error renders it as {"error": "..."} with its status.

Proved by: tests/contract/test_serve_http.py::test_bad_input_is_a_clear_4xx_and_the_server_stays_healthy,
tests/unit/test_serve_transformer.py::test_a_request_error_keeps_its_status_and_message.
"""
from __future__ import annotations

from http import HTTPStatus

from sagemaker_inference.errors import GenericInferenceToolkitError


class RequestError(GenericInferenceToolkitError):
    """A 4xx answer: the request cannot be served as sent; the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message, HTTPStatus(status).phrase)

    def __str__(self) -> str:
        return f"{self.status_code}: {self.message}"


def bad_request(message: str) -> RequestError:
    return RequestError(HTTPStatus.BAD_REQUEST, message)


def unsupported_media_type(message: str) -> RequestError:
    return RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, message)


def not_acceptable(message: str) -> RequestError:
    return RequestError(HTTPStatus.NOT_ACCEPTABLE, message)


def payload_too_large(message: str) -> RequestError:
    return RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message)
