"""Open Inference Protocol (KServe V2) codecs: JSON tensors and the binary tensor extension."""

from batchserve.protocol.v2 import (
    HEADER_LENGTH,
    InferRequest,
    decode_request,
    encode_request,
    encode_response,
)

__all__ = ["HEADER_LENGTH", "InferRequest", "decode_request", "encode_request", "encode_response"]
