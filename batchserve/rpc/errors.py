"""The one mapping from an error to a gRPC status, by the HTTP status the error already has, so
that both front ends refuse the same calls for the same reasons."""

from __future__ import annotations

import logging
from typing import Final

import grpc

from batchserve.errors import BatchserveError

log = logging.getLogger("batchserve.rpc")

Code = grpc.StatusCode

# Keyed by `BatchserveError.status`. PayloadTooLarge (413) is RESOURCE_EXHAUSTED because gRPC
# itself answers a message over the receive limit (--max-body-mb) so: a tensor over
# --max-tensor-elements and an oversized message get the same code. Only load shedding (429)
# and a server not ready (503) carry the retry hint, which tells them apart from it.
BY_HTTP_STATUS: Final[dict[int, grpc.StatusCode]] = {
    400: Code.INVALID_ARGUMENT,  # InvalidInput
    401: Code.UNAUTHENTICATED,  # Unauthorized
    404: Code.NOT_FOUND,  # ModelNotFound
    408: Code.DEADLINE_EXCEEDED,  # BodyTimeout
    409: Code.FAILED_PRECONDITION,  # RepositoryConflict: not with --workers
    413: Code.RESOURCE_EXHAUSTED,  # PayloadTooLarge
    415: Code.INVALID_ARGUMENT,  # UnsupportedMediaType
    422: Code.UNIMPLEMENTED,  # UnsupportedInput: a tensor type the server cannot serve
    429: Code.RESOURCE_EXHAUSTED,  # Overloaded
    500: Code.INTERNAL,  # InferenceFailed, ModelLoadError, DeviceUnavailable
    503: Code.UNAVAILABLE,  # NotReady, draining
    504: Code.DEADLINE_EXCEEDED,  # DeadlineExceeded
}

RETRY_AFTER: Final = (("retry-after", "1"),)  # seconds, as HTTP's Retry-After
_RETRY_STATUSES: Final = frozenset({429, 503})


class Refusal:
    """An error as both protocols answer it: the HTTP `status` (what metrics and the access
    log count), the gRPC `code`, the `message` and the `trailing` metadata."""

    __slots__ = ("code", "message", "status", "trailing")

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.code = BY_HTTP_STATUS.get(status) or (
            Code.INVALID_ARGUMENT if status < 500 else Code.INTERNAL
        )
        self.message = message
        retry = status in _RETRY_STATUSES
        self.trailing: tuple[tuple[str, str], ...] = RETRY_AFTER if retry else ()


def refusal(err: BaseException, what: str) -> Refusal:
    """The refusal for `err`, raised while serving `what` (an RPC's name). Any error that is
    not a BatchserveError is a fault of the server's: logged with its traceback here, and the
    client gets INTERNAL without one."""
    if isinstance(err, BatchserveError):
        return Refusal(err.status, err.message)
    log.error("unhandled error in %s", what, exc_info=err)
    return Refusal(500, "internal server error")


async def abort(context: grpc.aio.ServicerContext, refused: Refusal) -> None:
    """End the call with the refusal's status (raises, as `context.abort` does)."""
    await context.abort(refused.code, refused.message, refused.trailing)
