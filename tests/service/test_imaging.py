"""Decoding client images to the model's input, without the web layer: header probe, per-image
and per-request limits, the mode allowlist, and the pixels that come out."""

from __future__ import annotations

import io
import re
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from service import imaging
from service.errors import ImageTooLarge, InvalidImage, TooManyPixels, UnsupportedImageMode
from service.imaging import (
    DecodeLimits,
    ImageHeader,
    check_request_pixels,
    configure_pillow,
    decode_image,
    probe_image,
)
from tests.service.conftest import encode

MNIST = (1, 28, 28)
LIMITS = DecodeLimits(max_side=4096, max_pixels=2048 * 2048, max_request_pixels=4 * 2048 * 2048)


def save(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR (8-bit grey) declaring width x height, with one empty
    IDAT: tens of bytes whatever the declared size, so only the header can be read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_decode_scales_8bit_grey_to_unit_range() -> None:
    array = np.arange(28 * 28, dtype=np.uint32).reshape(28, 28).astype(np.uint8)
    image = decode_image(encode(array), MNIST, LIMITS)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == MNIST
    np.testing.assert_allclose(image.pixels[0], array / 255.0, atol=1e-6)
    assert (image.original_size, image.resized) == ((28, 28), False)


def test_probe_reads_the_header_only() -> None:
    # The pixel data is absent: a probe that decoded would fail, this one reports the header.
    assert probe_image(png_declaring(4096, 1024), "x", LIMITS) == ImageHeader(
        "x", "PNG", 4096, 1024, "L"
    )
    rgb = encode(np.zeros((30, 40, 3), np.uint8), "JPEG")
    assert probe_image(rgb, "y", LIMITS) == ImageHeader("y", "JPEG", 40, 30, "RGB")


def test_probe_refuses_png_declaring_16m_pixels_in_one_row_without_decoding() -> None:
    bomb = png_declaring(1, 16_777_216)
    assert len(bomb) < 100
    start = time.process_time()
    for _ in range(64):  # the attack: 64 of them in one request
        with pytest.raises(ImageTooLarge) as refused:
            probe_image(bomb, "files[0] ('bomb.png')", LIMITS)
    assert time.process_time() - start < 0.5  # decoding each would cost tens of ms
    assert refused.value.message == (
        "files[0] ('bomb.png') is over the limit of 4096 pixels per side (1x16777216 declared); "
        "refused before decoding"
    )
    with pytest.raises(ImageTooLarge, match=r"per side \(16777216x1 declared\)"):
        decode_image(png_declaring(16_777_216, 1), MNIST, LIMITS)


def test_probe_bounds_both_sides_and_the_pixels_of_one_image() -> None:
    assert probe_image(png_declaring(4096, 1), "x", LIMITS).pixels == 4096
    with pytest.raises(ImageTooLarge, match=r"4096 pixels per side \(1x4097 declared\)"):
        probe_image(png_declaring(1, 4097), "x", LIMITS)
    assert probe_image(png_declaring(2048, 2048), "x", LIMITS).pixels == 2048 * 2048
    with pytest.raises(ImageTooLarge) as refused:
        probe_image(png_declaring(2049, 2048), "x", LIMITS)
    assert refused.value.message == (
        "x is over the limit of 4194304 pixels per image (2049x2048 = 4196352 pixels declared); "
        "refused before decoding"
    )


def test_request_budget_counts_the_declared_pixels_of_all_images() -> None:
    headers = [probe_image(png_declaring(2048, 2048), f"files[{i}]", LIMITS) for i in range(4)]
    check_request_pixels(headers, LIMITS)  # exactly the budget
    headers.insert(2, probe_image(png_declaring(2, 1), "files[2] ('two.png')", LIMITS))
    with pytest.raises(TooManyPixels) as refused:
        check_request_pixels(headers, LIMITS)
    assert refused.value.message == (
        "the request's 5 images are over the limit of 16777216 pixels per request (16777218 "
        "pixels declared; the largest, files[0], is 2048x2048); refused before decoding"
    )


def float_tiff(array: np.ndarray) -> bytes:
    return save(Image.fromarray(array.astype(np.float32)), "TIFF", compression="tiff_adobe_deflate")


def test_float_tiff_is_refused_by_mode_before_its_size_is_decoded() -> None:
    # The attack: 94 KB that decodes to 4096 x 4096 float32 (64 MiB). The mode is judged first.
    data = float_tiff(np.zeros((4096, 4096)))
    assert len(data) < 200_000
    start = time.process_time()
    with pytest.raises(UnsupportedImageMode) as refused:
        decode_image(data, MNIST, LIMITS, "files[0] ('f.tif')")
    assert time.process_time() - start < 0.1
    assert refused.value.status == 415
    assert refused.value.message == (
        "files[0] ('f.tif') has image mode F (32-bit floating point), which is not supported "
        f"(supported: {imaging.SUPPORTED_MODES})"
    )


@pytest.mark.parametrize(
    ("array", "described"),
    [
        (np.full((28, 28), np.nan, np.float32), "F (32-bit floating point)"),
        (np.full((28, 28), np.inf, np.float32), "F (32-bit floating point)"),
        (np.arange(28 * 28, dtype=np.int32).reshape(28, 28) * 10_000, "I (32-bit signed integer)"),
    ],
)
def test_32bit_float_and_integer_tiffs_are_refused(array: np.ndarray, described: str) -> None:
    data = save(Image.fromarray(array), "TIFF")
    with pytest.raises(
        UnsupportedImageMode, match=f"^x has image mode {re.escape(described)}, which"
    ):
        probe_image(data, "x", LIMITS)
    with pytest.raises(UnsupportedImageMode):
        decode_image(data, MNIST, LIMITS, "x")


def test_lab_tiff_is_refused() -> None:
    data = save(Image.new("LAB", (28, 28)), "TIFF")
    with pytest.raises(UnsupportedImageMode, match=r"^x has image mode LAB, which is not"):
        decode_image(data, MNIST, LIMITS, "x")


def test_16bit_grey_png_and_tiff_scale_by_65535() -> None:
    array = (np.arange(28 * 28, dtype=np.uint32).reshape(28, 28) * 83).astype(np.uint16)
    array[0, 0], array[0, 1] = 0, 65535
    png = save(Image.fromarray(array), "PNG")
    big_endian = save(Image.frombytes("I;16B", (28, 28), array.astype(">u2").tobytes()), "TIFF")
    assert probe_image(png, "x", LIMITS).mode == "I;16"  # what this Pillow reports
    assert probe_image(big_endian, "x", LIMITS).mode == "I;16B"
    for data in (png, big_endian):
        image = decode_image(data, MNIST, LIMITS)
        assert not image.resized
        np.testing.assert_allclose(image.pixels[0], array / 65535.0, atol=1e-6)
    rgb = decode_image(png, (3, 28, 28), LIMITS).pixels
    np.testing.assert_allclose(rgb, np.stack([array / 65535.0] * 3), atol=1e-6)


def test_16bit_grey_is_scaled_when_resized() -> None:
    array = np.full((280, 560), 1000, np.uint16)
    array[:, :280] = 60000
    image = decode_image(save(Image.fromarray(array), "PNG"), MNIST, LIMITS)
    assert image.resized and image.original_size == (560, 280)
    np.testing.assert_allclose(image.pixels[0, :, :12], 60000 / 65535, atol=1e-4)
    np.testing.assert_allclose(image.pixels[0, :, -12:], 1000 / 65535, atol=1e-4)


def test_decode_drops_alpha_and_converts_to_model_channels() -> None:
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255
    grey = decode_image(encode(rgba), MNIST, LIMITS)
    np.testing.assert_allclose(grey.pixels, 1.0)
    rgb = decode_image(encode(np.full((28, 28), 128, np.uint8)), (3, 32, 32), LIMITS)
    assert rgb.pixels.shape == (3, 32, 32) and rgb.resized
    np.testing.assert_allclose(rgb.pixels, 128 / 255, atol=1e-6)
    grey_alpha = np.stack([np.full((28, 28), 64, np.uint8), np.zeros((28, 28), np.uint8)], -1)
    rgb = decode_image(encode(grey_alpha), (3, 28, 28), LIMITS)
    np.testing.assert_allclose(rgb.pixels, 64 / 255, atol=1e-6)


def test_grey_with_alpha_keeps_the_grey() -> None:
    la = np.zeros((28, 28, 2), np.uint8)
    la[..., 0] = np.arange(28, dtype=np.uint8)[None, :] * 9
    la[..., 1] = np.arange(28, dtype=np.uint8)[:, None]  # alpha varies, ignored
    data = encode(la)
    assert probe_image(data, "x", LIMITS).mode == "LA"
    np.testing.assert_allclose(decode_image(data, MNIST, LIMITS).pixels[0], la[..., 0] / 255.0)


def test_palette_with_transparency_and_palette_alpha_decode_to_their_colours() -> None:
    indices = np.zeros((28, 28), np.uint8)
    indices[7:21, 7:21] = 1
    palette = Image.fromarray(indices, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    with_alpha = save(palette, "PNG", transparency=0)  # index 0 transparent (tRNS chunk)
    palette_alpha = save(palette.convert("PA"), "TIFF")
    for data, mode in ((with_alpha, "P"), (palette_alpha, "PA")):
        assert probe_image(data, "x", LIMITS).mode == mode
        np.testing.assert_allclose(decode_image(data, MNIST, LIMITS).pixels[0], indices)
        rgb = decode_image(data, (3, 28, 28), LIMITS).pixels
        np.testing.assert_allclose(rgb, np.stack([indices] * 3))


def test_1bit_image_decodes_to_zero_and_one() -> None:
    checker = (np.indices((28, 28)).sum(axis=0) % 2).astype(bool)
    data = save(Image.fromarray(checker), "PNG")
    assert probe_image(data, "x", LIMITS).mode == "1"
    np.testing.assert_allclose(decode_image(data, MNIST, LIMITS).pixels[0], checker)


def test_cmyk_jpeg_and_ycbcr_tiff_still_decode() -> None:
    white_cmyk = save(Image.new("CMYK", (28, 28), (0, 0, 0, 0)), "JPEG", quality=95)
    assert probe_image(white_cmyk, "x", LIMITS).mode == "CMYK"
    np.testing.assert_allclose(decode_image(white_cmyk, MNIST, LIMITS).pixels, 1.0, atol=0.02)
    grey = Image.new("RGB", (28, 28), (128, 128, 128)).convert("YCbCr")
    ycbcr = save(grey, "TIFF")
    assert probe_image(ycbcr, "x", LIMITS).mode == "YCbCr"
    np.testing.assert_allclose(
        decode_image(ycbcr, (3, 28, 28), LIMITS).pixels, 128 / 255, atol=0.02
    )


def test_exif_orientation_is_applied_to_the_small_image() -> None:
    # Stored 28 wide x 14 tall, white on the left; orientation 6 shows it turned 90 degrees
    # clockwise: 14 wide x 28 tall, white on top. The model wants (1, 28, 14): no resize.
    stored = np.zeros((14, 28), np.uint8)
    stored[:, :14] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    for fmt in ("PNG", "JPEG"):
        data = save(Image.fromarray(stored), fmt, exif=exif.tobytes())
        image = decode_image(data, (1, 28, 14), LIMITS)
        assert (image.original_size, image.resized) == ((28, 14), False)
        np.testing.assert_allclose(image.pixels[0, :12], 1.0, atol=0.05)
        np.testing.assert_allclose(image.pixels[0, -12:], 0.0, atol=0.05)
    # Square model input: resized from the upright 14x28, still white on top.
    image = decode_image(save(Image.fromarray(stored), "PNG", exif=exif.tobytes()), MNIST, LIMITS)
    assert image.resized
    assert image.pixels[0, :12].min() > 0.95 and image.pixels[0, -12:].max() < 0.05


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_decodes_as_pillow_shows_it_upright(orientation: int) -> None:
    # A lossless PNG stored 28 wide x 14 tall, decoded for a model that takes its upright size
    # (no resize): the pixels are exactly Pillow's own ImageOps.exif_transpose of the image.
    stored = Image.fromarray(
        np.random.default_rng(orientation).integers(0, 256, (14, 28), dtype=np.uint8)
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = save(stored, "PNG", exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as opened:
        upright = np.asarray(ImageOps.exif_transpose(opened), dtype=np.float64) / 255.0
    assert upright.shape == ((28, 14) if orientation >= 5 else (14, 28))
    image = decode_image(data, (1, *upright.shape), LIMITS)
    assert (image.original_size, image.resized) == ((28, 14), False)
    np.testing.assert_allclose(image.pixels[0], upright, rtol=0, atol=1e-6)


def test_decode_large_jpeg_resizes_and_keeps_original_size() -> None:
    photo = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    image = decode_image(encode(photo, "JPEG"), MNIST, LIMITS)
    assert image.pixels.shape == MNIST
    assert (image.original_size, image.resized) == ((1600, 1200), True)


def test_downscaling_averages_instead_of_sampling() -> None:
    # A 1-pixel checkerboard averages to mid-grey; sampling would give 0 or 1.
    checker = (np.indices((2048, 2048)).sum(axis=0) % 2 * 255).astype(np.uint8)
    pixels = decode_image(encode(checker), MNIST, LIMITS).pixels
    np.testing.assert_allclose(pixels, 0.5, atol=0.01)


def test_decode_gif_takes_the_first_frame() -> None:
    frames = [Image.new("L", (28, 28), 0), Image.new("L", (28, 28), 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    np.testing.assert_allclose(decode_image(buffer.getvalue(), MNIST, LIMITS).pixels, 0.0)


def test_decode_tiff_takes_the_first_page_and_judges_only_it() -> None:
    pages = [Image.new("L", (28, 28), 255), Image.new("F", (4096, 4096))]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    np.testing.assert_allclose(decode_image(buffer.getvalue(), MNIST, LIMITS).pixels, 1.0)


def test_results_that_are_not_finite_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # No accepted mode yields NaN; the guard stands in case a conversion ever does.
    def broken(*args: object) -> tuple[np.ndarray, bool]:
        return np.full((28, 28, 1), np.nan, np.float32), False

    monkeypatch.setattr(imaging, "_to_array", broken)
    with pytest.raises(InvalidImage, match="^x decodes to values that are not finite; refused$"):
        decode_image(encode(np.zeros((28, 28), np.uint8)), MNIST, LIMITS, "x")


def test_pillow_limit_stays_a_second_guard() -> None:
    # Our limits let this TIFF through; Pillow's, set lower, refuses it before allocating.
    configure_pillow(1000)
    data = save(Image.new("L", (64, 64)), "TIFF")
    with pytest.raises(ImageTooLarge, match="decompression bomb"):
        decode_image(data, MNIST, LIMITS)


def test_decode_refuses_formats_outside_the_list() -> None:
    buffer = io.BytesIO()
    Image.new("L", (28, 28)).save(buffer, format="PPM")
    with pytest.raises(InvalidImage, match="is not a decodable image"):
        decode_image(buffer.getvalue(), MNIST, LIMITS)


def test_decode_refuses_empty_and_oversized_images() -> None:
    with pytest.raises(InvalidImage, match="image is empty"):
        decode_image(b"", MNIST, LIMITS)
    small = DecodeLimits(max_side=100, max_pixels=100, max_request_pixels=100)
    with pytest.raises(
        ImageTooLarge, match=r"over the limit of 100 pixels per image \(28x28 = 784 pixels"
    ):
        decode_image(encode(np.zeros((28, 28), np.uint8)), MNIST, small)
