"""Which path a request to a model's infer URL takes (raw body to the handler, or V2), and the
shape of a handler's answer in each protocol. Pure functions: the HTTP layer calls them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

import numpy as np
import orjson

from batchserve.errors import UnsupportedMediaType
from batchserve.runtime.metadata import ModelMetadata

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


def encode_body(value: Any) -> bytes:
    """A handler's answer as a JSON body (numpy arrays and scalars allowed; an
    `orjson.Fragment`, what `HandlerPipeline` returns, is JSON already and copied as is)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def v2_outputs(value: Any) -> dict[str, np.ndarray]:
    """A handler's answer as V2 outputs: `predictions`, BYTES, shape [1], its JSON text. Fits
    the V2 response encoder as it is (JSON or binary outputs)."""
    array = np.empty(1, dtype=object)
    array[0] = encode_body(value).decode()
    return {PREDICTIONS: array}
