"""Image decoding, bounded: bytes from the client -> float32 [C, H, W] in [0, 1] for the model.

Three pure steps, no web imports, so a decode pool can call them from any thread:

1. `probe_image` reads one image's header only (Pillow opens lazily; no pixel is decoded) and
   refuses a mode a classifier does not take (415 `unsupported_image_mode`: 32-bit float `F`,
   32-bit or signed integer `I`, `LAB`, ...) and a declared size over the per-image limits
   (413 `image_too_large`: width or height over `max_side`, or width x height over
   `max_pixels`). The mode is judged first: a smaller copy of an `F` image would still fail.
2. `check_request_pixels` adds up the declared pixels of all the probed images of a request and
   refuses the request (413 `too_many_pixels`) over `max_request_pixels`, before any of them is
   decoded. Decoding costs CPU in proportion to pixels, so this bounds one request's work.
3. `decode_image` decodes the first frame / page only (GIF, APNG, multi-page TIFF) on the
   smallest arrays it can: a JPEG is decoded by libjpeg at 1/2..1/8 scale (`draft`) when the
   model needs far fewer pixels, every image keeps its 8- or 16-bit samples until it has been
   resized (bilinear, no crop; 8-bit images are box-`reduce`d first) to the model's input, and
   only then becomes float32; EXIF orientation is applied to that small result. So one
   maximum-size image costs about its own decoded bytes (at most 4 per pixel) plus one 8-bit
   converted copy, never a full-size float32 array.

Accepted modes: 1-bit, 8-bit grey (`L`, `LA`), palette (`P`, `PA`), `RGB`, `RGBA`, `CMYK` and
`YCbCr` (converted through RGB), and 16-bit unsigned grey (`I;16*`; older Pillow reports a 16-bit
PNG as `I`, which is accepted for PNG only, as PNG has no deeper grey), scaled by 1/65535. Alpha
is dropped; EXIF orientation is applied. A result that is not finite is refused all the same
(defence in depth: no accepted mode can produce one).

Pillow's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) is set to `max_pixels` with its
warning raised as an error: a second guard where Pillow checks again (TIFF before allocating,
GIF frames, WebP) and for any other `Image.open` in the process. The probe reads the header
through the format's own plugin, as `Image.open` does but without that check first, so that our
refusal, naming the declared size, the mode and the limit, is the one a client sees.
"""

from __future__ import annotations

import logging
import struct
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import ExifTags, Image, ImageFile

from service.errors import (
    ImageTooLarge,
    InvalidImage,
    ServiceError,
    TooManyPixels,
    UnsupportedImageMode,
)

logger = logging.getLogger(__name__)

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
# Raw request bodies: the Content-Types we accept (anything else is 415).
CONTENT_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/bmp",
        "image/x-bmp",
        "image/x-ms-bmp",
        "image/gif",
        "image/webp",
        "image/tiff",
    }
)
# 8-bit modes, converted to L or RGB at full size (cheap: at most 4 bytes a pixel in, 3 out).
_EIGHT_BIT = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})
_GREY = frozenset({"1", "L", "LA"})
# Pillow converts these to L only through RGB in some versions; go through RGB explicitly.
_VIA_RGB = frozenset({"CMYK", "YCbCr"})
# 16-bit unsigned grey in each byte order; resized as 16-bit, then scaled by 1/65535.
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_SIXTEEN_BIT_MAX = 65535.0
SUPPORTED_MODES = "1-bit, 8-bit grey (L, LA), palette (P, PA), RGB, RGBA, CMYK, YCbCr, 16-bit grey"
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class DecodeLimits:
    """What one image and one request may declare; `service.settings` holds the defaults."""

    max_side: int  # largest width or height of one image
    max_pixels: int  # largest width x height of one image
    max_request_pixels: int  # largest sum of width x height over one request's images


@dataclass(frozen=True)
class ImageHeader:
    """What an image declares in its header, read without decoding any pixel."""

    what: str  # how errors name the image, e.g. `files[1] ('x.png')`
    format: str  # one of FORMATS
    width: int
    height: int
    mode: str  # Pillow's mode of the first frame, e.g. L, RGB, I;16

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # float32 [C, H, W] in [0, 1], finite
    original_size: tuple[int, int]  # (width, height) as sent
    resized: bool


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow refuse anything over our pixel limit instead of merely warning."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    Image.init()  # register every plugin now, not on the first TIFF or WebP request


def _open(data: bytes, what: str) -> ImageFile.ImageFile:
    """`Image.open(..., formats=FORMATS)`: the first plugin that accepts the bytes reads the
    header; nothing is decoded. Unlike `Image.open`, Pillow's size check does not run first, so
    `_check` judges the mode and the declared size and names them in its refusal."""
    prefix = data[:16]
    for name in FORMATS:
        if name not in Image.OPEN:
            Image.init()  # TIFF and WebP are registered on first use
        factory, accept = Image.OPEN[name]
        accepted = accept is None or accept(prefix)
        if not accepted or isinstance(accepted, str):  # str: "looks like it, but unsupported"
            continue
        try:
            return factory(BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # what Image.open does: not this format after all, try the next one
    raise InvalidImage(f"{what} is not a decodable image (supported: {', '.join(FORMATS)})")


def _describe_mode(image: ImageFile.ImageFile) -> str:
    """` (32-bit floating point)` and the like, for the modes a client may not recognise."""
    if image.mode == "F":
        return " (32-bit floating point)"
    if image.mode == "I":
        tags = getattr(image, "tag_v2", {})  # TIFF says what it holds; TIFF's default: unsigned
        bits = tags.get(258, (32,))[0]
        signed = "signed " if tags.get(339, (1,))[0] == 2 else ""
        return f" ({bits}-bit {signed}integer)"
    return ""


def _check(image: ImageFile.ImageFile, what: str, limits: DecodeLimits) -> ImageHeader:
    header = ImageHeader(what, str(image.format), image.width, image.height, image.mode)
    sixteen_bit_png = header.mode == "I" and header.format == "PNG"
    if header.mode not in _EIGHT_BIT | _SIXTEEN_BIT and not sixteen_bit_png:
        raise UnsupportedImageMode(
            f"{what} has image mode {header.mode}{_describe_mode(image)}, which is not "
            f"supported (supported: {SUPPORTED_MODES})"
        )
    declared = f"{header.width}x{header.height}"
    if max(header.width, header.height) > limits.max_side:
        raise ImageTooLarge(
            f"{what} is over the limit of {limits.max_side} pixels per side ({declared} "
            "declared); refused before decoding"
        )
    if header.pixels > limits.max_pixels:
        raise ImageTooLarge(
            f"{what} is over the limit of {limits.max_pixels} pixels per image ({declared} = "
            f"{header.pixels} pixels declared); refused before decoding"
        )
    return header


@contextmanager
def _opened(
    data: bytes, what: str, limits: DecodeLimits
) -> Iterator[tuple[ImageFile.ImageFile, ImageHeader]]:
    """The lazily opened image and its checked header; every failure inside becomes ours."""
    if not data:
        raise InvalidImage(f"{what} is empty")
    try:
        with _open(data, what) as image:
            yield image, _check(image, what, limits)
    except ServiceError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's second guard fired (a GIF frame or a TIFF tile larger than the header said).
        raise ImageTooLarge(
            f"{what} is over the limit of {limits.max_pixels} pixels per image ({exc}); "
            "refused before decoding"
        ) from None
    except Exception as exc:  # Pillow's decoders raise OSError, ValueError, SyntaxError, ...
        logger.debug("cannot decode %s", what, exc_info=True)
        raise InvalidImage(f"{what} cannot be decoded: {exc}") from None


def probe_image(data: bytes, what: str, limits: DecodeLimits) -> ImageHeader:
    """One image's header, checked against the per-image limits; no pixel is decoded.

    Raises InvalidImage (400), UnsupportedImageMode (415) or ImageTooLarge (413). `what` names
    the image in the message. Costs microseconds whatever size the header declares.
    """
    with _opened(data, what, limits) as (_, header):
        return header


def check_request_pixels(headers: Sequence[ImageHeader], limits: DecodeLimits) -> None:
    """Refuse a request whose images declare more than `max_request_pixels` in all (413).

    Call with every probed header of the request before decoding any of them.
    """
    total = sum(header.pixels for header in headers)
    if total > limits.max_request_pixels:
        largest = max(headers, key=lambda header: header.pixels)
        raise TooManyPixels(
            f"the request's {len(headers)} images are over the limit of "
            f"{limits.max_request_pixels} pixels per request ({total} pixels declared; the "
            f"largest, {largest.what}, is {largest.width}x{largest.height}); refused before "
            "decoding"
        )


def _orientation(image: ImageFile.ImageFile) -> int:
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) else 1


def _to_array(
    image: ImageFile.ImageFile, header: ImageHeader, channels: int, size: tuple[int, int]
) -> tuple[np.ndarray, bool]:
    """Decode the first frame and resize it to `size` (width, height) upright: float32
    [H, W, C] in [0, 1], and whether the upright image had another size. Full-size arrays stay
    8- or 16-bit; float32 appears only at the model's size."""
    orientation = _orientation(image)  # a PNG may keep its eXIf chunk after the pixel data
    width, height = size
    # Resize in the stored orientation and turn the small result upright.
    stored = (height, width) if orientation in _SWAPS_AXES else (width, height)
    resized = (header.width, header.height) != stored
    # Grey stays grey until it is small, even for an RGB model: a third of the full-size bytes.
    target = "L" if channels == 1 or header.mode in _GREY else "RGB"
    if header.format in ("JPEG", "MPO"):  # MPO: a phone camera's multi-picture JPEG
        image.draft(target, stored)  # libjpeg scales by 1/2..1/8, never below `stored`
    image.load()
    work: Image.Image = image
    if header.mode in _EIGHT_BIT:
        maximum = 255.0
        if work.mode in _VIA_RGB:
            work = work.convert("RGB")
        if work.mode != target:
            work = work.convert(target)  # alpha dropped; palette and 1-bit expanded
        if work.size != stored:
            work = work.resize(stored, Image.Resampling.BILINEAR, reducing_gap=3.0)
    else:
        # 16-bit grey: Pillow resizes it as 16-bit (it cannot box-reduce it first); convert()
        # would clip it to 8 bits, so it is scaled here instead.
        maximum = _SIXTEEN_BIT_MAX
        if work.size != stored:
            work = work.resize(stored, Image.Resampling.BILINEAR)
    if orientation in _ORIENTATION:
        work = work.transpose(_ORIENTATION[orientation])
    array = np.asarray(work, dtype=np.float32) / np.float32(maximum)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] != channels:  # grey for an RGB model
        array = np.repeat(array, channels, axis=2)
    return array, resized


def decode_image(
    data: bytes, shape: tuple[int, int, int], limits: DecodeLimits, what: str = "image"
) -> DecodedImage:
    """Decode one image to the model's input `shape` (C, H, W). `what` names it in errors.

    Probes first (the same checks as `probe_image`), so it is safe on its own; the request's
    pixel budget is the caller's (`check_request_pixels`), as it needs every header at once.
    """
    channels, height, width = shape
    with _opened(data, what, limits) as (image, header):
        array, resized = _to_array(image, header, channels, (width, height))
    pixels = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)
    if not np.isfinite(pixels).all():
        raise InvalidImage(f"{what} decodes to values that are not finite; refused")
    return DecodedImage(pixels, (header.width, header.height), resized)
