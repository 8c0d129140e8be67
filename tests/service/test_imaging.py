"""Decoding client images to the model's input, without the web layer."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import ImageTooLarge, InvalidImage
from service.imaging import decode_image
from tests.service.conftest import encode

MNIST = (1, 28, 28)


def test_decode_scales_8bit_grey_to_unit_range() -> None:
    array = np.arange(28 * 28, dtype=np.uint32).reshape(28, 28).astype(np.uint8)
    image = decode_image(encode(array), MNIST, 10_000)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == MNIST
    np.testing.assert_allclose(image.pixels[0], array / 255.0, atol=1e-6)
    assert (image.original_size, image.resized) == ((28, 28), False)


def test_decode_scales_16bit_png_instead_of_clipping() -> None:
    array = np.full((28, 28), 65535 // 2, np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue(), MNIST, 10_000)
    np.testing.assert_allclose(image.pixels, 0.5, atol=0.01)


def test_decode_drops_alpha_and_converts_to_model_channels() -> None:
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255
    grey = decode_image(encode(rgba), MNIST, 10_000)
    np.testing.assert_allclose(grey.pixels, 1.0)
    rgb = decode_image(encode(np.full((28, 28), 128, np.uint8)), (3, 32, 32), 10_000)
    assert rgb.pixels.shape == (3, 32, 32) and rgb.resized


def test_decode_large_jpeg_resizes_and_keeps_original_size() -> None:
    photo = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    image = decode_image(encode(photo, "JPEG"), MNIST, 16_000_000)
    assert image.pixels.shape == MNIST
    assert (image.original_size, image.resized) == ((1600, 1200), True)


def test_decode_gif_takes_the_first_frame() -> None:
    frames = [Image.new("L", (28, 28), 0), Image.new("L", (28, 28), 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    np.testing.assert_allclose(decode_image(buffer.getvalue(), MNIST, 10_000).pixels, 0.0)


def test_decode_refuses_formats_outside_the_list() -> None:
    buffer = io.BytesIO()
    Image.new("L", (28, 28)).save(buffer, format="PPM")
    with pytest.raises(InvalidImage, match="is not a decodable image"):
        decode_image(buffer.getvalue(), MNIST, 10_000)


def test_decode_refuses_empty_and_oversized_images() -> None:
    with pytest.raises(InvalidImage, match="image is empty"):
        decode_image(b"", MNIST, 10_000)
    with pytest.raises(ImageTooLarge, match=r"over the limit of 100 pixels \(28x28 = 784 pixels\)"):
        decode_image(encode(np.zeros((28, 28), np.uint8)), MNIST, 100)
