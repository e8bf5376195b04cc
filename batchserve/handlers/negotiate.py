"""Which path a call to a model with a handler takes (a raw payload or V2 tensors to the
handler, or V2 tensors straight to the model), the request the handler gets, and the shape of
its answer in each protocol. Pure functions: the engine calls them, below every front end."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import orjson

from batchserve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from batchserve.handlers.base import RawRequest
from batchserve.runtime import ModelMetadata

if TYPE_CHECKING:
    from batchserve.call import Call

# The one output of a V2 response to a request that went through a handler: a BYTES tensor of
# shape [1] holding the handler's JSON body.
PREDICTIONS: Final = "predictions"

# Media types that can only be a raw payload (never a V2 body). Anything else keeps the V2 path
# it always had, whatever its Content-Type says (curl -d sends form-urlencoded).
_RAW_FAMILIES: Final = ("image/", "audio/", "video/")

Route = Literal["raw", "v2"]


def media_type(content_type: str | None) -> str:
    """`Image/JPEG; q=1` → `image/jpeg`; empty when there is none."""
    if not content_type:
        return ""
    return content_type.partition(";")[0].strip().lower()


def choose_route(content_type: str | None, accepted: frozenset[str]) -> Route:
    """`raw` when the handler takes this body type; `v2` for everything that is not clearly a
    raw payload; UnsupportedMediaType (415) for a raw payload type nothing here can take.
    `accepted` is the handler's `media_types`, empty when the model has no handler."""
    media = media_type(content_type)
    if media in accepted:
        return "raw"
    if media.startswith(_RAW_FAMILIES):
        if accepted:
            raise UnsupportedMediaType(
                f"unsupported Content-Type {media!r}; this model takes {sorted(accepted)} "
                "or a V2 inference request"
            )
        raise UnsupportedMediaType(
            f"unsupported Content-Type {media!r}: this model has no handler for raw bodies; "
            "send a V2 inference request (application/json)"
        )
    return "v2"


def wants_handler(inputs: Mapping[str, np.ndarray], metadata: ModelMetadata) -> bool:
    """Whether a decoded V2 request goes through the model's handler: it carries a BYTES input
    the model does not take as BYTES (an encoded image for an FP32 model, say). A V2 request
    that already holds the model's own tensors goes straight to the model."""
    specs = {t.name: t.datatype for t in metadata.inputs}
    return any(
        array.dtype.kind in "OSU" and specs.get(name) != "BYTES" for name, array in inputs.items()
    )


def handler_request(call: Call) -> RawRequest:
    """The request a handler takes from a call: its raw payload, or its V2 tensors. V2 tensors
    through a handler have one output, `predictions` (InvalidInput, 400, for any other)."""
    if call.body is not None:
        return RawRequest.from_body(
            call.body, media_type(call.content_type), call.headers, call.parameters
        )
    if call.outputs and set(call.outputs) != {PREDICTIONS}:
        raise InvalidInput(
            f"a request through the handler has one output, {PREDICTIONS!r}; "
            f"asked for {list(call.outputs)}"
        )
    return RawRequest.from_v2(call.inputs, call.parameters, call.headers)


def encode_body(value: Any) -> bytes:
    """A handler's answer as a JSON body (numpy arrays and scalars allowed; an
    `orjson.Fragment`, what `HandlerPipeline` returns, is JSON already and copied as is)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def answer_body(value: Any, max_bytes: int | None) -> bytes:
    """`encode_body`, bounded: PayloadTooLarge (413) when the JSON takes more than `max_bytes`
    (None: no limit)."""
    body = encode_body(value)
    if max_bytes is not None and len(body) > max_bytes:
        raise PayloadTooLarge(
            f"the handler's answer takes {len(body)} bytes, over the limit of {max_bytes}"
        )
    return body


def v2_outputs(value: Any) -> dict[str, np.ndarray]:
    """A handler's answer as V2 outputs: `predictions`, BYTES, shape [1], its JSON text. Fits
    the V2 response encoder as it is (JSON or binary outputs)."""
    array = np.empty(1, dtype=object)
    array[0] = encode_body(value).decode()
    return {PREDICTIONS: array}
