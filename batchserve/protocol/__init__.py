"""Open Inference Protocol (KServe V2) codecs: JSON tensors and the binary tensor extension."""

from batchserve.protocol.v2 import (
    DEFAULT_LIMITS,
    HEADER_LENGTH,
    DecodeLimits,
    InferRequest,
    decode_request,
    encode_request,
    encode_response,
    response_size,
)

__all__ = [
    "DEFAULT_LIMITS",
    "HEADER_LENGTH",
    "DecodeLimits",
    "InferRequest",
    "decode_request",
    "encode_request",
    "encode_response",
    "response_size",
]
