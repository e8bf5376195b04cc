"""Image decoding and the torchvision-style transforms of the image handler.

Only JPEG and PNG are decoded, and only after their headers' declared size passed the pixel
limit: a decompression bomb is refused from its first bytes, and no other image parser
(with its own attack surface) ever sees client data.
"""

from __future__ import annotations

import io
from typing import Final, Literal

import numpy as np
from PIL import Image

from batchserve.errors import InvalidInput, PayloadTooLarge

try:  # optional: libjpeg-turbo's own API, ~1.5x Pillow's JPEG decode (docs/handlers.md)
    import simplejpeg  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

Format = Literal["jpeg", "png"]
Decoder = Literal["pillow", "simplejpeg"]

HAVE_SIMPLEJPEG: Final = simplejpeg is not None
_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC: Final = b"\xff\xd8\xff"
# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: no length
# A resized image up to this many times the short side squared (aspect ratios to 16:1, 3 MB
# at 256) is made whole, exactly as torchvision does; a longer one only where it is cropped.
FULL_RESIZE_MAX_AREA: Final = 16


def sniff(data: bytes) -> Format:
    """The format from the first bytes (the Content-Type is only the client's claim)."""
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data.startswith(_PNG_MAGIC):
        return "png"
    raise InvalidInput("the image is neither a JPEG nor a PNG file (or is corrupt)")


def declared_size(data: bytes, fmt: Format) -> tuple[int, int]:
    """(width, height) from the header, without decoding; InvalidInput when unreadable."""
    size = _png_size(data) if fmt == "png" else _jpeg_size(data)
    if size is None or size[0] <= 0 or size[1] <= 0:
        raise InvalidInput(f"corrupt {fmt.upper()} image: no valid size in its header")
    return size


def _png_size(data: bytes) -> tuple[int, int] | None:
    # The IHDR chunk must come first: 8-byte signature, length, "IHDR", width, height.
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _STANDALONE:
            i += 2
        elif marker in _SOF:
            if i + 9 > end:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height
        elif marker in (0xD9, 0xDA):  # end of image or scan data before any frame header
            return None
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} pixels"
        )


def decode(
    data: bytes, max_pixels: int, decoder: Decoder, draft_short_side: int = 0
) -> Image.Image:
    """An RGB image; 413 past `max_pixels`, 400 when corrupt. `draft_short_side` > 0 lets a
    JPEG decode at 1/2, 1/4 or 1/8 scale (in the DCT, far cheaper) while its shorter side
    stays at least that long."""
    fmt = sniff(data)
    check_pixels(declared_size(data, fmt), max_pixels)
    if fmt == "jpeg" and decoder == "simplejpeg" and simplejpeg is not None:
        pixels = _simplejpeg(data, draft_short_side)
        if pixels is not None:
            return Image.fromarray(pixels)
    return _pillow(data, fmt, max_pixels, draft_short_side)


def _simplejpeg(data: bytes, draft_short_side: int) -> np.ndarray | None:
    """None when simplejpeg cannot take it (CMYK, say): Pillow gets a try."""
    assert simplejpeg is not None
    try:
        if draft_short_side:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            # Only the shorter side has a minimum; the other follows the aspect ratio.
            min_h, min_w = (draft_short_side, 0) if height <= width else (0, draft_short_side)
            pixels = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_height=min_h, min_width=min_w
            )
        else:
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
        return np.asarray(pixels)
    except ValueError:
        return None


def _pillow(data: bytes, fmt: Format, max_pixels: int, draft_short_side: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as image:
            # Pillow's own reading of the header is the one its decoder obeys: check it too.
            check_pixels(image.size, max_pixels)
            if draft_short_side and fmt == "jpeg":
                image.draft("RGB", (draft_short_side, draft_short_side))
            image.load()
            return image.convert("RGB") if image.mode != "RGB" else image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise PayloadTooLarge(f"image too large: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        # Pillow reports corrupt and truncated files as any of these.
        raise InvalidInput(f"corrupt {fmt.upper()} image: {err}") from None


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, the other in proportion, bilinear with antialiasing: what
    torchvision's `Resize(size)` does to a PIL image."""
    new = _short_side_size(image.size, size)
    if new == image.size:
        return image
    return image.resize(new, Image.Resampling.BILINEAR)


def resize_center_crop(image: Image.Image, size: int, height: int, width: int) -> Image.Image:
    """`resize_short_side(image, size)` then the centre `height`x`width` (torchvision's
    `Resize(size)` + `CenterCrop`); `size` must be >= `height` and `width`.

    The resized image grows with the aspect ratio: a 40000x1 PNG of a hundred bytes would
    become 10 gigapixels. Past FULL_RESIZE_MAX_AREA times `size` squared only the crop is
    resampled, from its box mapped back to source coordinates, so the work stays
    `height`x`width` whatever the aspect ratio. The same source points and filter, but Pillow
    takes the box in float32: pixels may differ by one level from the full resize, which is
    why ordinary images keep the exact path."""
    new_w, new_h = _short_side_size(image.size, size)
    left, top = _crop_origin(new_h, new_w, height, width)
    if new_w * new_h <= FULL_RESIZE_MAX_AREA * size * size:
        resized = resize_short_side(image, size)
        return resized.crop((left, top, left + width, top + height))
    # Pillow maps output pixel i of a box resize to box[0] + (i + 0.5) * box_width / out_width,
    # the source point of pixel left + i of the full resize.
    scale_x, scale_y = image.size[0] / new_w, image.size[1] / new_h
    box = (left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)
    return image.resize((width, height), Image.Resampling.BILINEAR, box=box)


def _short_side_size(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    width, height = size
    if min(width, height) == short_side:
        return size
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def _crop_origin(full_h: int, full_w: int, height: int, width: int) -> tuple[int, int]:
    """(left, top) of a centred crop, rounded as torchvision's `CenterCrop` rounds."""
    return round((full_w - width) / 2.0), round((full_h - height) / 2.0)


def normalise(
    pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], nchw: bool
) -> np.ndarray:
    """uint8 HWC → float32 (x/255 - mean) / std, CHW when `nchw`."""
    scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float64))).astype(np.float32)
    offset = (-np.asarray(mean, dtype=np.float64) / np.asarray(std)).astype(np.float32)
    # 256 values per channel, computed once per image: a table lookup is twice as fast as
    # converting and scaling every pixel, and gives the same float32 values.
    table = np.arange(256, dtype=np.float32)[None, :] * scale[:, None] + offset[:, None]
    height, width, channels = pixels.shape
    if not nchw:
        out = np.empty((height, width, channels), np.float32)
        for c in range(channels):
            np.take(table[c], pixels[:, :, c], out=out[:, :, c])
        return out
    out = np.empty((channels, height, width), np.float32)
    for c in range(channels):
        np.take(table[c], pixels[:, :, c], out=out[c])
    return out
