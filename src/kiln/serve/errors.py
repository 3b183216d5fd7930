"""Errors a served request can get: each maps to one HTTP status and one gRPC status code."""
from __future__ import annotations

from kiln.errors import KilnError


class ServeError(KilnError):
    """A request the server refuses; ``status`` is its HTTP status, ``grpc_code`` its gRPC code name."""

    status = 400
    grpc_code = "INVALID_ARGUMENT"
    reason = "bad_request"          # the ``reason`` label of the failure metric


class BadRequest(ServeError):
    """Malformed JSON, wrong tensor name/dtype/shape, a shape outside every profile, a short payload."""


class NotFound(ServeError):
    status, grpc_code, reason = 404, "NOT_FOUND", "not_found"


class TooLarge(ServeError):
    status, grpc_code, reason = 413, "RESOURCE_EXHAUSTED", "too_large"


class Unavailable(ServeError):
    """The model's queue is full, the model is unloading, or the server is draining."""

    status, grpc_code, reason = 503, "UNAVAILABLE", "unavailable"


class DeadlineExceeded(ServeError):
    status, grpc_code, reason = 504, "DEADLINE_EXCEEDED", "timeout"


class InternalError(ServeError):
    status, grpc_code, reason = 500, "INTERNAL", "internal"
