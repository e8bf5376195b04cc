"""Find a handler by `package.module:Class` or built-in name, set it up and check it fits the
model before the model reports ready."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from batchserve.errors import InvalidInput, ModelLoadError
from batchserve.handlers.base import Handler, RawRequest
from batchserve.handlers.negotiate import encode_body
from batchserve.runtime import ModelMetadata

BUILTIN_HANDLERS: Mapping[str, str] = {
    "image-classification": "batchserve.handlers.image:ImageClassificationHandler",
}


def load_handler(spec: str) -> Handler:
    """A new handler instance from `package.module:Class` (a class or zero-argument factory)
    or a built-in name; ModelLoadError says what is wrong."""
    target = BUILTIN_HANDLERS.get(spec.strip(), spec.strip())
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ModelLoadError(
            f"handler {spec!r}: expected 'package.module:Class' or a built-in name, "
            f"one of {sorted(BUILTIN_HANDLERS)}"
        )
    try:
        module = importlib.import_module(module_name)
    except BaseException as err:  # an ImportError, or whatever the module raises (sys.exit too)
        raise ModelLoadError(
            f"handler {spec!r}: cannot import module {module_name!r}: {type(err).__name__}: {err}"
        ) from err
    factory: Any = module
    for part in attribute.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise ModelLoadError(
                f"handler {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not callable(factory):
        raise ModelLoadError(f"handler {spec!r}: {attribute!r} is not a class or factory")
    try:
        handler = factory()
    except BaseException as err:
        raise ModelLoadError(f"handler {spec!r}: {attribute}() failed: {_why(err)}") from err
    if not isinstance(handler, Handler):
        raise ModelLoadError(
            f"handler {spec!r}: {attribute!r} is not a handler: it needs preprocess(request) "
            "and postprocess(outputs, request) methods"
        )
    return handler


def setup_handler(
    handler: Handler, metadata: ModelMetadata, options: Mapping[str, str] | None = None
) -> None:
    """Call the handler's optional `setup`; options given to a handler without one are an error."""
    setup = getattr(handler, "setup", None)
    if setup is None:
        if options:
            raise ModelLoadError(
                f"handler {_name(handler)} takes no options, got {sorted(options)}"
            )
        return
    try:
        setup(metadata, dict(options or {}))
    except ModelLoadError:
        raise
    except BaseException as err:
        raise ModelLoadError(f"handler {_name(handler)}: setup failed: {_why(err)}") from err


def prepare_handler(
    spec: str, metadata: ModelMetadata, options: Mapping[str, str] | None = None
) -> Handler:
    """`load_handler` and `setup_handler`: a handler ready for requests."""
    handler = load_handler(spec)
    setup_handler(handler, metadata, options)
    return handler


def check_handler(handler: Handler, metadata: ModelMetadata) -> bool:
    """Run the handler's `sample_request` through preprocess (its arrays must fit the model's
    input names, datatypes and shapes) and postprocess (on zeros shaped like the outputs; the
    body must be JSON). False when the handler offers no sample: nothing could be checked."""
    sample_request = getattr(handler, "sample_request", None)
    name = _name(handler)
    try:
        sample: RawRequest | None = sample_request(metadata) if callable(sample_request) else None
    except BaseException as err:
        raise ModelLoadError(f"handler {name}: sample_request failed: {_why(err)}") from err
    if sample is None:
        return False
    try:
        inputs = handler.preprocess(sample)
    except BaseException as err:
        raise ModelLoadError(
            f"handler {name}: preprocess failed on its sample: {_why(err)}"
        ) from err
    try:
        rows = check_inputs(inputs, metadata)
    except InvalidInput as err:
        raise ModelLoadError(
            f"handler {name} does not fit the model: its preprocess output {_shapes(inputs)} "
            f"does not match the model's inputs "
            f"{[t.as_dict() for t in metadata.inputs]}: {err.message}"
        ) from None
    try:
        encode_body(handler.postprocess(sample_outputs(metadata, rows), sample))
    except BaseException as err:
        raise ModelLoadError(
            f"handler {name}: postprocess failed on its sample: {_why(err)}"
        ) from err
    return True


def check_inputs(inputs: object, metadata: ModelMetadata) -> int:
    """The row count of a preprocess result, or InvalidInput saying how it misses the model."""
    if not isinstance(inputs, dict) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in inputs.items()
    ):
        raise InvalidInput("preprocess must return a dict of input name -> numpy array")
    return metadata.validate(inputs)[1]


def sample_outputs(metadata: ModelMetadata, rows: int) -> dict[str, np.ndarray]:
    """Zeros shaped like the model's outputs for `rows` rows (other variable dims: 1)."""
    outputs: dict[str, np.ndarray] = {}
    for spec in metadata.outputs:
        shape = [d if d >= 0 else 1 for d in spec.shape]
        if metadata.batched:
            shape[0] = rows
        outputs[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return outputs


def _why(err: BaseException) -> str:
    # A bare KeyError or sys.exit(3) says little without its type.
    return str(err) if isinstance(err, Exception) and str(err) else f"{type(err).__name__}: {err}"


def _name(handler: object) -> str:
    cls = type(handler)
    return f"{cls.__module__}:{cls.__qualname__}"


def _shapes(inputs: object) -> object:
    if isinstance(inputs, dict):
        return {k: f"{v.dtype}{list(v.shape)}" for k, v in inputs.items() if hasattr(v, "shape")}
    return type(inputs).__name__


__all__ = [
    "BUILTIN_HANDLERS",
    "check_handler",
    "check_inputs",
    "load_handler",
    "prepare_handler",
    "sample_outputs",
    "setup_handler",
]
