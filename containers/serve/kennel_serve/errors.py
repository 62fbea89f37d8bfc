"""Errors a client caused, as the inference toolkit's own error type.

sagemaker-inference turns a BaseInferenceToolkitError into an HTTP response with its
status code; every other exception becomes a 500. kennel_serve.transformer renders both as
a short JSON body without the traceback the toolkit would append.
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
