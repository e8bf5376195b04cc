"""The built-in `image-classification` handler: JPEG/PNG in, top-k labels out.

Preprocessing is torchvision's ImageNet evaluation transform: shorter side to 256 (bilinear,
antialiased), centre crop to the model's input size, x/255, (x - mean) / std, NCHW float32.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from PIL import Image

from batchserve.errors import InvalidInput, ModelLoadError, PayloadTooLarge, UnsupportedMediaType
from batchserve.handlers import imaging
from batchserve.handlers.base import RawRequest
from batchserve.runtime import ModelMetadata, TensorSpec

IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)
MEDIA_TYPES: Final = frozenset({"image/jpeg", "image/jpg", "image/png"})

DecoderChoice = Literal["auto", "pillow", "simplejpeg"]


@dataclass(frozen=True, slots=True)
class ImageOptions:
    """`--handler-option KEY=VALUE` settings of the image-classification handler.

    top_k: labels per image (a request's V2 `parameters.top_k` or `?top_k=` may lower or
        raise it, up to the number of classes).
    labels: a text file with one label per line, line i for class i; else `class_<i>`.
    mean, std: per-channel normalisation, three comma-separated numbers each (RGB).
    resize: the shorter side before the centre crop.
    crop: the crop size when the model's height and width are variable (else the model's).
    apply_softmax: the model returns logits (true) or probabilities already (false).
    max_pixels: width x height allowed in the image header (larger: 413, before decoding).
    max_images: images in one V2 request (more: 413).
    decoder: JPEG decoder: auto (simplejpeg when installed), pillow or simplejpeg.
    draft: decode JPEGs at 1/2, 1/4 or 1/8 scale when still >= `resize` (much faster on
        large photos; results differ slightly from the reference transform).
    output: the model output holding the scores (default: the first).
    """

    top_k: int = 5
    labels: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: int = 256
    crop: int = 224
    apply_softmax: bool = True
    max_pixels: int = 40_000_000
    max_images: int = 64
    decoder: DecoderChoice = "auto"
    draft: bool = False
    output: str | None = None

    def __post_init__(self) -> None:
        for name in ("top_k", "resize", "crop", "max_pixels", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        if self.decoder not in ("auto", "pillow", "simplejpeg"):
            raise ValueError("decoder must be auto, pillow or simplejpeg")
        if self.decoder == "simplejpeg" and not imaging.HAVE_SIMPLEJPEG:
            raise ValueError("decoder=simplejpeg but simplejpeg is not installed")
        pillow_limit = Image.MAX_IMAGE_PIXELS
        # Above it Pillow warns or refuses on its own; one limit, ours, keeps answers exact.
        if pillow_limit is not None and self.max_pixels > pillow_limit:
            raise ValueError(f"max_pixels must be <= {pillow_limit} (Pillow's own bomb limit)")

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> ImageOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ModelLoadError(
                f"image-classification: unknown option(s) {unknown}; known: {sorted(known)}"
            )
        values: dict[str, Any] = {}
        try:
            for key, text in options.items():
                values[key] = _PARSERS.get(key, str)(text)
            return cls(**values)
        except ValueError as err:
            raise ModelLoadError(f"image-classification: bad option: {err}") from None

    @property
    def jpeg_decoder(self) -> imaging.Decoder:
        if self.decoder == "auto":
            return "simplejpeg" if imaging.HAVE_SIMPLEJPEG else "pillow"
        return self.decoder


def _triple(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3:
        raise ValueError(f"expected three comma-separated numbers, got {text!r}")
    return parts[0], parts[1], parts[2]


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


_PARSERS: Final[dict[str, Any]] = {
    "top_k": int, "mean": _triple, "std": _triple, "resize": int, "crop": int,
    "apply_softmax": _boolean, "max_pixels": int, "max_images": int, "draft": _boolean,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Model:
    """What the handler needs to know about the model, worked out once in `setup`."""

    input: TensorSpec
    nchw: bool
    size: tuple[int, int]  # height, width of the crop
    output: str
    classes: int  # -1: unknown until the first answer
    labels: tuple[str, ...] | None


class ImageClassificationHandler:
    """Encoded images → `{"predictions": [[{"label", "index", "score"}, ...], ...]}`, one list
    of the top-k classes per image, best first.

    A raw `image/jpeg` or `image/png` body is one image. A V2 request with one BYTES input of
    N elements (bytes in the binary extension, base64 text in JSON) is a batch of N images.
    """

    media_types: frozenset[str] = MEDIA_TYPES

    def __init__(self) -> None:
        self.options = ImageOptions()
        self._model: _Model | None = None

    def setup(self, metadata: ModelMetadata, options: Mapping[str, str]) -> None:
        self.options = ImageOptions.parse(options)
        self._model = _inspect(metadata, self.options)

    def sample_request(self, metadata: ModelMetadata) -> RawRequest:
        gradient = np.linspace(0, 255, 64 * 48 * 3).astype(np.uint8).reshape(48, 64, 3)
        buffer = io.BytesIO()
        Image.fromarray(gradient).save(buffer, "PNG")
        return RawRequest.from_body(buffer.getvalue(), "image/png")

    def preprocess(self, request: RawRequest) -> dict[str, np.ndarray]:
        model = self._ready()
        _top_k(request, self.options.top_k)  # a bad parameter is a 400 before any work
        images = self.images(request)
        batch = np.stack([self.transform(data) for data in images])
        return {model.input.name: batch.astype(model.input.dtype, copy=False)}

    def images(self, request: RawRequest) -> list[bytes]:
        """The encoded images a request carries (415/400/413 when it carries none usable)."""
        if request.inputs is None:
            if request.content_type not in MEDIA_TYPES:
                raise UnsupportedMediaType(
                    f"unsupported Content-Type {request.content_type!r}; "
                    f"send one of {sorted(MEDIA_TYPES)}"
                )
            if not request.body:
                raise InvalidInput("empty request body: expected a JPEG or PNG image")
            return [request.body]
        return _v2_images(request.inputs, self.options.max_images)

    def transform(self, data: bytes) -> np.ndarray:
        """One encoded image → the model's input for it (CHW or HWC float32)."""
        model, options = self._ready(), self.options
        draft = options.resize if options.draft else 0
        image = imaging.decode(data, options.max_pixels, options.jpeg_decoder, draft)
        cropped = imaging.resize_center_crop(image, options.resize, *model.size)
        pixels = np.asarray(cropped)
        return imaging.normalise(pixels, options.mean, options.std, model.nchw)

    def postprocess(self, outputs: Mapping[str, np.ndarray], request: RawRequest) -> Any:
        model = self._ready()
        raw_scores = np.asarray(outputs[model.output])
        raw_scores = raw_scores.reshape(raw_scores.shape[0], -1)
        k = min(_top_k(request, self.options.top_k), raw_scores.shape[1])
        # Ranked on the raw scores: softmax keeps their order, but far-apart logits underflow
        # to equal zeros. Stable: equal scores are listed by class index.
        best = np.argsort(-raw_scores, axis=1, kind="stable")[:, :k]
        scores = _softmax(raw_scores) if self.options.apply_softmax else raw_scores
        labels = model.labels
        return {
            "predictions": [
                [
                    {
                        "label": labels[i] if labels and i < len(labels) else f"class_{i}",
                        "index": int(i),
                        "score": float(row[i]),
                    }
                    for i in indexes
                ]
                for row, indexes in zip(scores, best, strict=True)
            ]
        }

    def _ready(self) -> _Model:
        if self._model is None:
            raise RuntimeError("ImageClassificationHandler.setup was not called")
        return self._model


def _inspect(metadata: ModelMetadata, options: ImageOptions) -> _Model:
    def fail(why: str) -> ModelLoadError:
        return ModelLoadError(f"image-classification handler: {why}")

    if len(metadata.inputs) != 1:
        raise fail(f"the model must have one image input, it has {list(metadata.input_names)}")
    spec = metadata.inputs[0]
    if spec.datatype not in ("FP32", "FP16") or len(spec.shape) != 4:
        raise fail(f"input {spec.name!r} must be FP32/FP16 of rank 4, got {spec.as_dict()}")
    nchw = spec.shape[3] != 3 or spec.shape[1] == 3
    height, width = (spec.shape[2], spec.shape[3]) if nchw else (spec.shape[1], spec.shape[2])
    size = (height if height > 0 else options.crop, width if width > 0 else options.crop)
    if options.resize < max(size):
        raise fail(f"resize={options.resize} is smaller than the crop {size[0]}x{size[1]}")
    output_name = options.output or metadata.output_names[0]
    if output_name not in metadata.output_names:
        raise fail(f"no output {output_name!r}; the model has {list(metadata.output_names)}")
    out_spec = metadata.outputs[metadata.output_names.index(output_name)]
    classes = out_spec.shape[-1] if len(out_spec.shape) >= 2 else -1
    labels = _read_labels(options.labels, classes) if options.labels else None
    return _Model(spec, nchw, size, output_name, classes, labels)


def _read_labels(path: str, classes: int) -> tuple[str, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"image-classification: cannot read labels file: {err}") from None
    labels = tuple(line.strip() for line in text.splitlines())
    while labels and not labels[-1]:
        labels = labels[:-1]
    if classes > 0 and len(labels) != classes:
        raise ModelLoadError(
            f"image-classification: {path} has {len(labels)} labels, "
            f"the model has {classes} classes"
        )
    return labels


def _v2_images(inputs: Mapping[str, np.ndarray], max_images: int) -> list[bytes]:
    if len(inputs) != 1:
        raise InvalidInput(f"send one BYTES input of encoded images, got inputs {sorted(inputs)}")
    ((name, array),) = inputs.items()
    if array.dtype.kind not in "OSU":
        raise InvalidInput(f"input {name!r} must be BYTES (encoded JPEG or PNG images)")
    if array.size == 0:
        raise InvalidInput(f"input {name!r} holds no images")
    if array.size > max_images:
        raise PayloadTooLarge(f"{array.size} images in one request; the limit is {max_images}")
    return [_element_bytes(name, i, value) for i, value in enumerate(array.flat)]


def _element_bytes(name: str, index: int, value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        # JSON cannot carry raw bytes: images in a JSON request are base64 text.
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(
                f"input {name!r} element {index}: not base64 (images in JSON must be base64)"
            ) from None
    raise InvalidInput(f"input {name!r} element {index} is not bytes or a base64 string")


def _softmax(logits: np.ndarray) -> np.ndarray:
    # float64: small probabilities stay distinguishable a little longer.
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return result


# Digits of a top_k parameter: any class count there is, far below the 4300 digits past which
# int() refuses a string (a ValueError, a 500 had it been let through).
_TOP_K_DIGITS: Final = 18


def _top_k(request: RawRequest, default: int) -> int:
    value = request.parameters.get("top_k", default)
    # ASCII only: str.isdigit() accepts "²", which int() refuses.
    if isinstance(value, str) and value.isascii() and value.isdigit():
        if len(value) > _TOP_K_DIGITS:
            raise InvalidInput(f"top_k must have at most {_TOP_K_DIGITS} digits")
        value = int(value)
    if type(value) is not int or value < 1:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:40] + "..."  # echo a bounded part
        raise InvalidInput(f"top_k must be a positive integer, got {shown}")
    return value
