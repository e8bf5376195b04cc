"""One exception tree for the whole server; each error knows its HTTP status."""

from __future__ import annotations


class BatchserveError(Exception):
    """Base class: every error a client can cause or see maps to one status."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(BatchserveError):
    status = 400


class Unauthorized(BatchserveError):
    status = 401


class ModelNotFound(BatchserveError):
    status = 404


class BodyTimeout(BatchserveError):
    """The client did not send its whole body in time (slow or stalled clients)."""

    status = 408


class PayloadTooLarge(BatchserveError):
    status = 413


class UnsupportedMediaType(BatchserveError):
    """The body's Content-Type is one this model (or its handler) cannot take."""

    status = 415


class UnsupportedInput(BatchserveError):
    status = 422


class Overloaded(BatchserveError):
    status = 429


class NotReady(BatchserveError):
    status = 503


class DeadlineExceeded(BatchserveError):
    status = 504


class InferenceFailed(BatchserveError):
    status = 500


class ModelLoadError(BatchserveError):
    """The model file is missing, unreadable or not a valid ONNX model."""

    status = 500


class DeviceUnavailable(BatchserveError):
    """The requested execution device (e.g. CUDA) is not available."""

    status = 500
