"""Custom pre- and post-processing around the batched model run (docs/handlers.md).

The image-classification handler (`batchserve.handlers.image`) needs Pillow:
`pip install 'batchserve[images]'`; it is imported only when loaded by name.
"""

from batchserve.handlers.base import BaseHandler, Handler, RawRequest, public_headers
from batchserve.handlers.config import ExecutorKind, HandlerConfig, parse_option
from batchserve.handlers.executor import ExecutorStatistics, HandlerExecutor
from batchserve.handlers.loader import (
    BUILTIN_HANDLERS,
    check_handler,
    load_handler,
    prepare_handler,
    setup_handler,
)
from batchserve.handlers.negotiate import (
    PREDICTIONS,
    answer_body,
    choose_route,
    encode_body,
    handler_request,
    media_type,
    v2_outputs,
    wants_handler,
)
from batchserve.handlers.pipeline import HandlerPipeline, InferFn

__all__ = [
    "BUILTIN_HANDLERS",
    "PREDICTIONS",
    "BaseHandler",
    "ExecutorKind",
    "ExecutorStatistics",
    "Handler",
    "HandlerConfig",
    "HandlerExecutor",
    "HandlerPipeline",
    "InferFn",
    "RawRequest",
    "answer_body",
    "check_handler",
    "choose_route",
    "encode_body",
    "handler_request",
    "load_handler",
    "media_type",
    "parse_option",
    "prepare_handler",
    "public_headers",
    "setup_handler",
    "v2_outputs",
    "wants_handler",
]
