"""The handler interface: per-request pre- and post-processing around the batched model run.

A request goes `preprocess` (one request → named arrays of N rows) → the batching queue, where
rows from many requests share one ONNX Runtime run → `postprocess` (this request's own N rows →
a JSON-serialisable body). Handlers see one request at a time; batching is the engine's job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from batchserve.runtime import ModelMetadata

# Credentials never reach handler code (nor, in process mode, another process).
_PRIVATE_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


@dataclass(frozen=True, slots=True)
class RawRequest:
    """One client request as a handler sees it, in exactly one of two forms.

    Raw body (`inputs is None`): `body` is the bytes the client posted (an encoded image, say)
    and `content_type` its media type, lower case, without parameters (`image/jpeg`).
    `parameters` holds the URL's query arguments as strings.

    V2 tensors (`inputs is not None`): the decoded tensors of a V2 request that carried a BYTES
    input the model itself does not take. A BYTES tensor is a numpy object array whose elements
    are `bytes` (binary tensor extension) or `str` (JSON, where binary data must be base64).
    `body` is empty, `content_type` is the V2 body's media type, and `parameters` the request's
    V2 `parameters` object.

    `headers` has lower-case names and never the credentials (Authorization, Cookie).
    Everything here is plain data, so the request can be sent to a worker process.
    """

    body: bytes = b""
    content_type: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    inputs: Mapping[str, np.ndarray] | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_body(
        cls,
        body: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
        parameters: Mapping[str, str] | None = None,
    ) -> RawRequest:
        return cls(body, content_type, public_headers(headers), None, dict(parameters or {}))

    @classmethod
    def from_v2(
        cls,
        inputs: Mapping[str, np.ndarray],
        parameters: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> RawRequest:
        return cls(b"", content_type, public_headers(headers), dict(inputs), dict(parameters or {}))


def public_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """A plain, picklable copy of the headers with lower-case names, without credentials."""
    if not headers:
        return {}
    return {k.lower(): v for k, v in headers.items() if k.lower() not in _PRIVATE_HEADERS}


@runtime_checkable
class Handler(Protocol):
    """What the server calls. Implementations must be safe to call from several threads at
    once (thread executor) and importable by `package.module:Class` (process executor).

    Optional methods, called when present:

    - `setup(metadata: ModelMetadata, options: Mapping[str, str]) -> None`: once, before any
      request, with the model's inputs/outputs and the `--handler-option KEY=VALUE` pairs.
    - `sample_request(metadata: ModelMetadata) -> RawRequest | None`: a valid request, run
      through `preprocess` and `postprocess` at load time to check the handler fits the model.

    Optional attribute `media_types: frozenset[str]`: raw body types the handler takes
    (e.g. `image/jpeg`); without it the handler is reached only by V2 BYTES inputs.

    Raise `batchserve.errors` types for the client's mistakes (`InvalidInput` 400,
    `PayloadTooLarge` 413, `UnsupportedMediaType` 415); any other exception is a server error
    (500) and is logged.
    """

    def preprocess(self, request: RawRequest) -> dict[str, np.ndarray]:
        """The model's inputs for this request: every input by name, all with the same number
        of rows (the leading dimension) when the model is batched."""
        ...

    def postprocess(self, outputs: Mapping[str, np.ndarray], request: RawRequest) -> Any:
        """The response body (JSON-serialisable) from this request's own output rows: every
        model output by name, as many rows as `preprocess` returned."""
        ...


class BaseHandler(ABC):
    """Convenience base class with the optional parts filled in; subclasses implement
    `preprocess` and `postprocess`."""

    media_types: frozenset[str] = frozenset()

    def setup(self, metadata: ModelMetadata, options: Mapping[str, str]) -> None:
        if options:
            raise ValueError(f"{type(self).__name__} takes no options, got {sorted(options)}")

    def sample_request(self, metadata: ModelMetadata) -> RawRequest | None:
        return None

    @abstractmethod
    def preprocess(self, request: RawRequest) -> dict[str, np.ndarray]:
        """See `Handler.preprocess`."""

    @abstractmethod
    def postprocess(self, outputs: Mapping[str, np.ndarray], request: RawRequest) -> Any:
        """See `Handler.postprocess`."""
