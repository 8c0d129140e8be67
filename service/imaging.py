"""Image decoding: bytes from the client -> float32 [C, H, W] in [0, 1] for the model's input.

Pillow decodes PNG, JPEG, BMP, GIF (first frame), WebP and TIFF (first page); nothing else is
even tried. The pixel limit is checked from the header, before any pixel data is decoded, so a
decompression bomb costs nothing: Pillow's own limit (`Image.MAX_IMAGE_PIXELS`) is set to ours
and its DecompressionBombWarning is raised as an error, and we check the size again ourselves.
Channels are converted to the model's (alpha is dropped), and an image of another size is
resized (bilinear, no crop) with `resized` set so the client can tell. No web imports.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ImageTooLarge, InvalidImage

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
_HIGH_DEPTH = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # 16/32-bit integer greyscale


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # float32 [C, H, W] in [0, 1]
    original_size: tuple[int, int]  # (width, height) as sent
    resized: bool


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow refuse anything over our pixel limit instead of merely warning."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _too_large(what: str, detail: str, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"{what} is over the limit of {max_pixels} pixels ({detail}); refused before decoding"
    )


def _to_array(image: Image.Image, channels: int, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """Convert to `channels`, resize to `size` (width, height); uint8-scaled float32 [H, W, C]."""
    resized = image.size != size
    if image.mode in _HIGH_DEPTH or image.mode == "F":
        # Pillow's convert("L") clips 16-bit values; scale them to 8-bit range instead.
        values = np.asarray(image, dtype=np.float32)
        if image.mode != "F":
            values = values / 257.0
        grey = Image.fromarray(np.clip(values, 0, 255).astype(np.float32), mode="F")
        if resized:
            grey = grey.resize(size, Image.Resampling.BILINEAR)
        array = np.asarray(grey, dtype=np.float32)[:, :, None]
        return (np.repeat(array, channels, axis=2) if channels == 3 else array), resized
    target = "L" if channels == 1 else "RGB"
    if image.mode != target:
        image = image.convert("RGB" if image.mode in ("CMYK", "YCbCr", "LAB", "HSV") else target)
        image = image.convert(target)
    if resized:
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    array = np.asarray(image, dtype=np.float32)
    return (array[:, :, None] if array.ndim == 2 else array), resized


def decode_image(
    data: bytes, shape: tuple[int, int, int], max_pixels: int, what: str = "image"
) -> DecodedImage:
    """Decode one image to the model's input `shape` (C, H, W). `what` names it in errors."""
    if not data:
        raise InvalidImage(f"{what} is empty")
    channels, height, width = shape
    try:
        with Image.open(BytesIO(data), formats=FORMATS) as image:
            original = image.size
            if original[0] * original[1] > max_pixels:
                detail = f"{original[0]}x{original[1]} = {original[0] * original[1]} pixels"
                raise _too_large(what, detail, max_pixels)
            if image.format == "JPEG":
                # Let libjpeg decode at a reduced scale when the model needs far fewer pixels.
                image.draft("L" if channels == 1 else "RGB", (width, height))
            image.load()  # first frame / page only
            array, resized = _to_array(ImageOps.exif_transpose(image), channels, (width, height))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(what, str(exc), max_pixels) from None
    except ImageTooLarge:
        raise
    except UnidentifiedImageError:
        raise InvalidImage(
            f"{what} is not a decodable image (supported: {', '.join(FORMATS)})"
        ) from None
    except Exception as exc:  # Pillow's decoders raise OSError, ValueError, SyntaxError, ...
        logger.debug("cannot decode %s", what, exc_info=True)
        raise InvalidImage(f"{what} cannot be decoded: {exc}") from None
    pixels = np.ascontiguousarray(array.transpose(2, 0, 1) / np.float32(255.0), dtype=np.float32)
    return DecodedImage(pixels, original, resized)
