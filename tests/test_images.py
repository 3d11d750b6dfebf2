"""bitray.images over the bad/odd input corpus of issue 3, plus the decode and resize decisions."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from image_corpus import (
    EXPECTED,
    cmyk_source,
    corpus,
    exif_rotated_jpeg,
    grey16,
    photo,
    png_bomb,
    png_header_only,
    rgb16,
)
from PIL import Image, ImageFile

from bitray.errors import BitrayError
from bitray.images import (
    DEFAULT_MAX_DECODE_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_bytes_estimate,
    decode_image,
    prepare_for_model,
    resize_for_model,
    resize_pixels,
)

ITEMS = corpus()


def _pillow_rgb(data: bytes) -> np.ndarray:
    """Plain Pillow decode, no orientation: the reference for what the file stores."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("name", sorted(ITEMS))
def test_every_corpus_item_ends_as_pixels_or_a_readable_error(name: str) -> None:
    item = ITEMS[name]
    if item.expected == "embedded":
        decoded = decode_image(item.data)
        assert decoded.pixels.dtype == np.uint8
        assert decoded.pixels.shape == (*item.shape, 3)
        assert (decoded.width, decoded.height) == item.stored_size
        reduced = decode_image(item.data, min_size=(32, 32))  # JPEGs at 1/2 scale, the rest unchanged
        assert (reduced.width, reduced.height) == item.stored_size
        assert min(reduced.pixels.shape[:2]) >= min(32, *item.shape)
    else:
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(item.data, min_size=(32, 32))
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(item.data)
        message = str(caught.value)
        assert item.reason in message.lower(), message
        assert len(message) < 200 and "object at 0x" not in message and "\n" not in message
        assert isinstance(caught.value, BitrayError)


def test_corpus_covers_issue_3_item_6() -> None:
    assert set(EXPECTED.values()) == {"embedded", "error"}
    for needed in (
        "empty.jpg",
        "truncated.jpg",
        "random bytes.jpg",
        "not-found.png",
        "notes.png",
        "alpha.png",
        "grey16.png",
        "grey.jpg",
        "palette.png",
        "cmyk.jpg",
        "exif-rotated.jpg",
        "one-pixel.png",
        "bomb-40000x40000.png",
        "animated.gif",
        "photo.webp",
        "photo.tiff",
        "photo.bmp",
        "name with spaces.jpg",
        "ünïcödé photo 写真.jpg",
    ):
        assert needed in EXPECTED
    assert len(ITEMS["bomb-40000x40000.png"].data) < 200


def test_exif_orientation_6_rotates_clockwise_and_reports_the_stored_size() -> None:
    data = exif_rotated_jpeg()
    stored = _pillow_rgb(data)
    assert stored.shape[1] > stored.shape[0]  # stored landscape
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded.pixels, np.rot90(stored, k=-1))
    assert (decoded.width, decoded.height) == (stored.shape[1], stored.shape[0])


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_does_not_reject_a_good_photo() -> None:
    buffer = io.BytesIO()
    Image.fromarray(photo("coffee")).save(
        buffer, "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x00" * 8
    )
    decoded = decode_image(buffer.getvalue())
    assert decoded.pixels.shape == (*photo("coffee").shape[:2], 3)


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    source = grey16()
    pixels = decode_image(ITEMS["grey16.png"].data).pixels
    assert pixels[0, 0].tolist() == [255, 255, 255]  # 65535
    assert pixels[0, 1].tolist() == [128, 128, 128]  # 32768
    expected = np.rint(source / 257).astype(np.uint8)
    np.testing.assert_array_equal(pixels[..., 0], expected)
    np.testing.assert_array_equal(pixels[1:, :, 0], photo("camera")[1:])
    assert np.unique(pixels).size > 100  # clipping would leave almost everything at 255


def test_16_bit_colour_is_scaled_not_clipped() -> None:
    pixels = decode_image(ITEMS["rgb16.png"].data).pixels
    assert pixels[0, 0].tolist() == [255, 128, 0]  # 65535, 32768, 0
    np.testing.assert_array_equal(pixels[1:], (rgb16()[1:] // 256).astype(np.uint8))
    np.testing.assert_array_equal(pixels[1:], photo("coffee")[1:])


def test_cmyk_jpeg_comes_back_close_to_the_source_colours() -> None:
    pixels = decode_image(ITEMS["cmyk.jpg"].data).pixels.astype(np.float32)
    source = cmyk_source().astype(np.float32)
    assert np.abs(pixels - source).mean() < 6.0
    assert np.abs(pixels.mean(axis=(0, 1)) - source.mean(axis=(0, 1))).max() < 3.0


def test_alpha_is_composited_on_white() -> None:
    rgb = photo("astronaut").astype(np.float32)
    pixels = decode_image(ITEMS["alpha.png"].data).pixels.astype(np.float32)
    quarter = rgb.shape[1] // 4
    assert (pixels[:, :quarter] == 255).all()  # alpha 0
    half = rgb[:, quarter : 2 * quarter] * 128 / 255 + 255 * 127 / 255  # alpha 128
    assert np.abs(pixels[:, quarter : 2 * quarter] - half).max() <= 1.0
    np.testing.assert_array_equal(pixels[:, 2 * quarter :], rgb[:, 2 * quarter :])  # opaque


def test_transparent_palette_index_becomes_white() -> None:
    data = ITEMS["palette-transparent.png"].data
    indices = np.asarray(Image.open(io.BytesIO(data)))
    pixels = decode_image(data).pixels
    assert (indices == 0).any()
    assert (pixels[indices == 0] == 255).all()
    assert not (pixels[indices != 0] == 255).all()


@pytest.mark.parametrize("name", ["animated.gif", "animated.webp"])
def test_animation_gives_its_first_frame(name: str) -> None:
    first = photo("chelsea").astype(np.float32)
    pixels = decode_image(ITEMS[name].data).pixels.astype(np.float32)
    assert np.abs(pixels - first).mean() < 12.0  # lossy / 256-colour encodings of frame 0
    assert np.abs(pixels - (255 - first)).mean() > 50.0  # not frame 1


def test_truncated_jpeg_is_an_error_even_if_pillow_was_told_to_accept_it(monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageDecodeError, match="truncated JPEG data"):
        decode_image(ITEMS["truncated.jpg"].data)


@pytest.mark.parametrize("fmt", ["TGA", "EPS"])
def test_formats_outside_the_list_are_refused(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(photo("coffee")).save(buffer, fmt)
    Image.open(io.BytesIO(buffer.getvalue()))  # Pillow on its own would open it
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(buffer.getvalue())


def _allocated_mb() -> float:
    return Image.core.get_stats()["allocated_blocks"] * Image.core.get_block_size() / 2**20


@pytest.mark.parametrize("width,height", [(40000, 40000), (12000, 12000)])
def test_bomb_header_is_rejected_before_any_pixel_memory(monkeypatch, width: int, height: int) -> None:
    # Pillow's own global limit switched off: bitray's per-call check alone must stop it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    data = png_header_only(width, height)
    decode_image(ITEMS["one-pixel.png"].data)  # warm up Pillow's plugins
    before = _allocated_mb()
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data)
    assert time.perf_counter() - start < 1.0
    assert _allocated_mb() - before < 50, "Pillow allocated image memory for a bomb"
    message = str(caught.value)
    assert f"{width}x{height}" in message and "over the limit" in message and "max_pixels" in message


def test_pillow_backstop_error_still_reads_well() -> None:
    with pytest.raises(ImageDecodeError, match=r"1\.6e\+09 pixels, over the limit of 1e\+08"):
        decode_image(ITEMS["bomb-40000x40000.png"].data)


def test_max_pixels_is_per_call_and_decides_over_pillows_global(monkeypatch) -> None:
    data = ITEMS["photo.bmp"].data  # 96x64 = 6144 pixels
    with pytest.raises(ImageDecodeError, match="96x64"):
        decode_image(data, max_pixels=6000)
    assert decode_image(data).pixels.shape == (64, 96, 3)  # the default is untouched by that call
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow alone would refuse 6144 pixels
    assert decode_image(data, max_pixels=10_000).pixels.shape == (64, 96, 3)
    assert DEFAULT_MAX_PIXELS >= 50_000_000  # 50 MP phone photos decode by default


# --- resize ----------------------------------------------------------------------------------------------


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased bilinear: a triangle filter over pixel centres, widened by the downscale factor."""
    scale = n_in / n_out
    width = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    distance = np.abs((np.arange(n_in) + 0.5)[None, :] - centres[:, None]) / width
    weights = np.clip(1.0 - distance, 0.0, None)
    return weights / weights.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("size", [(32, 32), (48, 40), (224, 224), (64, 96)])
def test_resize_matches_an_independent_triangle_filter(size: tuple[int, int]) -> None:
    pixels = photo("chelsea")
    out = resize_for_model(pixels, size)
    assert out.shape == (*size, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    rows, cols = _triangle_weights(pixels.shape[0], size[0]), _triangle_weights(pixels.shape[1], size[1])
    reference = np.einsum("ih,hwc,jw->ijc", rows, pixels.astype(np.float64), cols) / 255
    assert np.abs(out - reference).max() <= 1.01 / 255  # Pillow rounds to uint8 between its two passes
    small = resize_pixels(pixels, size)
    assert small.dtype == np.uint8
    np.testing.assert_array_equal(np.round(out * 255).astype(np.uint8), small)  # lossless as uint8


def test_resize_edge_cases() -> None:
    same = photo("coffee")
    np.testing.assert_allclose(resize_for_model(same, same.shape[:2]), same / 255, atol=1e-7)
    one = decode_image(ITEMS["one-pixel.png"].data).pixels
    np.testing.assert_allclose(
        resize_for_model(one, (32, 32)), np.broadcast_to(one / 255, (32, 32, 3)), atol=1e-7
    )
    with pytest.raises(ValueError, match="uint8"):
        resize_for_model(same.astype(np.float32), (32, 32))
    with pytest.raises(ValueError, match=r"\[h, w, 3\]"):
        resize_for_model(photo("camera"), (32, 32))


def test_prepare_for_model_is_decode_then_uint8_resize() -> None:
    data = ITEMS["exif-rotated.jpg"].data
    decoded = decode_image(data)
    pixels, width, height = prepare_for_model(data, (40, 32))
    assert pixels.dtype == np.uint8 and (width, height) == (decoded.width, decoded.height)
    np.testing.assert_allclose(
        pixels / np.float32(255), resize_for_model(decoded.pixels, (40, 32)), atol=1e-6
    )


def _full_size_jpeg(name: str, exif: bytes = b"") -> bytes:
    from skimage import data as skdata

    buffer = io.BytesIO()
    Image.fromarray(getattr(skdata, name)()).save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def test_min_size_decodes_big_jpegs_at_a_reduced_scale_with_the_same_result() -> None:
    data = _full_size_jpeg("coffee")  # 600x400
    full = decode_image(data)
    reduced = decode_image(data, min_size=(64, 48))
    assert (reduced.width, reduced.height) == (full.width, full.height) == (600, 400)
    assert reduced.pixels.shape == (400 // 4, 600 // 4, 3)  # 1/4: the smallest scale keeping 64 px
    difference = resize_for_model(reduced.pixels, (64, 48)) - resize_for_model(full.pixels, (64, 48))
    assert np.abs(difference).mean() < 1.5 / 255 and np.abs(difference).max() < 16 / 255


def test_min_size_keeps_orientation_and_leaves_other_formats_alone() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    reduced = decode_image(_full_size_jpeg("chelsea", exif.tobytes()), min_size=(64, 64))  # 451x300
    assert (reduced.width, reduced.height) == (451, 300)
    assert reduced.pixels.shape == (451 // 4 + 1, 300 // 4, 3)  # rotated; libjpeg rounds sizes up
    bmp = ITEMS["photo.bmp"].data
    assert decode_image(bmp, min_size=(32, 32)).pixels.shape == decode_image(bmp).pixels.shape


# --- fast decode (the pipeline's default) and exact decode ------------------------------------------------


def _large_photo(name: str, fmt: str, size: tuple[int, int] = (2000, 1500), **options) -> bytes:
    """A scikit-image photo upscaled to ``size`` (w, h), as a camera-sized file."""
    from skimage import data as skdata

    image = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    buffer = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_fast_decode_of_a_large_jpeg_is_smaller_before_the_resize_and_close_to_exact(name: str) -> None:
    data = _large_photo(name, "JPEG", quality=90)
    drafted = decode_image(data, min_size=(224, 224))
    assert drafted.pixels.shape == (375, 500, 3)  # 1/4 scale: 1/8 would leave 188 < 224 rows
    fast, width, height = prepare_for_model(data, (224, 224))
    exact, *_ = prepare_for_model(data, (224, 224), exact=True)
    assert (width, height) == (2000, 1500) and fast.shape == exact.shape == (224, 224, 3)
    difference = np.abs(fast.astype(np.int16) - exact)
    # measured on these photos: mean 0.41-0.46, max 8-9 (of 255)
    assert 0 < difference.mean() < 1.0 and difference.max() <= 16


def test_exact_decode_is_byte_identical_to_full_decode_then_one_resize() -> None:
    for data in (_large_photo("chelsea", "JPEG", quality=90), _large_photo("rocket", "PNG")):
        exact, *_ = prepare_for_model(data, (224, 224), exact=True)
        full = decode_image(data).pixels
        assert full.shape == (1500, 2000, 3)
        expected = np.asarray(Image.fromarray(full).resize((224, 224), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(exact, expected)


def test_fast_decode_box_reduces_other_formats_by_integer_factors_first() -> None:
    data = _large_photo("rocket", "PNG")
    full = decode_image(data, min_size=(224, 224)).pixels  # PNG has no draft: full size
    assert full.shape == (1500, 2000, 3)
    fast, *_ = prepare_for_model(data, (224, 224))
    # 2000 / 224 / 2 -> 4 and 1500 / 224 / 2 -> 3: a 500x500 box reduction, then the antialiased resize
    reduced = Image.fromarray(full).reduce((4, 3))
    assert reduced.size == (500, 500)
    np.testing.assert_array_equal(fast, np.asarray(reduced.resize((224, 224), Image.Resampling.BILINEAR)))
    exact, *_ = prepare_for_model(data, (224, 224), exact=True)
    difference = np.abs(fast.astype(np.int16) - exact)
    assert 0 < difference.mean() < 1.0  # measured: 0.23
    small = ITEMS["photo.bmp"].data  # 96x64 to 32x32: no reduction pays, so none happens
    np.testing.assert_array_equal(
        prepare_for_model(small, (32, 32))[0], prepare_for_model(small, (32, 32), exact=True)[0]
    )


def test_fast_decode_of_a_rotated_jpeg_to_a_non_square_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 2000x1500 landscape, shown as 1500x2000 portrait
    data = _large_photo("coffee", "JPEG", quality=90, exif=exif.tobytes())
    assert decode_image(data, min_size=(320, 240)).pixels.shape == (500, 375, 3)  # 1/4, then rotated
    fast, width, height = prepare_for_model(data, (320, 240))
    exact, *_ = prepare_for_model(data, (320, 240), exact=True)
    assert (width, height) == (2000, 1500) and fast.shape == (320, 240, 3)
    assert np.abs(fast.astype(np.int16) - exact).mean() < 1.0


# --- the decode-memory budget ----------------------------------------------------------------------------


def test_png_bomb_within_the_pixel_limit_is_refused_from_its_header() -> None:
    bomb = png_bomb(9000, 9000)  # 81 MP, under the 100 MP limit; about 600 KB
    assert len(bomb) < 1_000_000 and DEFAULT_MAX_PIXELS > 9000 * 9000
    decode_image(ITEMS["one-pixel.png"].data)  # warm up Pillow's plugins
    before = _allocated_mb()
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError) as caught:
        prepare_for_model(bomb, (224, 224))
    assert time.perf_counter() - start < 0.5  # decoding 81 MP of PNG alone takes seconds
    assert _allocated_mb() - before < 50, "Pillow allocated image memory for a bomb"
    message = str(caught.value)
    assert message == (  # 81 MP x 27 bytes: RGBA, a rotated copy, compositing onto white, RGB, the array
        "decoding 9000x9000 RGBA pixels needs about 2086 MB, over the decode-memory budget of 1200 MB; "
        "raise max_decode_mb if intended"
    )
    with pytest.raises(ImageDecodeError, match="needs about 2086 MB"):  # exact mode: the same
        prepare_for_model(bomb, (224, 224), exact=True)
    small = decode_image(png_bomb(64, 48))  # the same kind of image, small: decodes (to white)
    assert small.pixels.shape == (48, 64, 3) and (small.pixels == 255).all()


def test_decode_budget_default_lets_a_100_megapixel_photo_through_and_not_a_60_megapixel_bomb() -> None:
    rgb_100mp = Image.open(io.BytesIO(png_header_only(10_000, 10_000)))  # 8-bit RGB header
    rgba_60mp = Image.open(io.BytesIO(png_bomb(7746, 7746)))
    assert decode_bytes_estimate(rgb_100mp) == 10_000 * 10_000 * 11 < DEFAULT_MAX_DECODE_BYTES
    assert decode_bytes_estimate(rgba_60mp) == 7746 * 7746 * 27 > DEFAULT_MAX_DECODE_BYTES
    grey16_png = Image.open(io.BytesIO(ITEMS["grey16.png"].data))
    assert grey16_png.mode.startswith("I")
    assert decode_bytes_estimate(grey16_png) >= grey16_png.width * grey16_png.height * 26


def test_decode_budget_counts_the_dct_scale_of_a_fast_jpeg_decode() -> None:
    data = _large_photo("chelsea", "JPEG", size=(4000, 3000), quality=80)  # 12 MP, 132 MB to decode
    budget = 64 * 2**20
    with pytest.raises(ImageDecodeError, match=r"4000x3000 RGB pixels needs about 126 MB.* 64 MB"):
        prepare_for_model(data, (224, 224), max_decode_bytes=budget, exact=True)
    pixels, width, height = prepare_for_model(data, (224, 224), max_decode_bytes=budget)  # 500x375
    assert pixels.shape == (224, 224, 3) and (width, height) == (4000, 3000)
    assert decode_image(data).pixels.shape == (3000, 4000, 3)  # the default budget holds it whole


def test_default_extensions_list_avif_and_jpeg_2000_files_that_decode(tmp_path) -> None:
    """The formats the README names as supported are listed by default, and decode (real files)."""
    from bitray import storage
    from bitray.config import EmbedConfig

    source = photo()
    for name, fmt in [("a.avif", "AVIF"), ("b.jp2", "JPEG2000"), ("c.j2k", "JPEG2000"), ("d.jpg", "JPEG")]:
        Image.fromarray(source).save(tmp_path / name, fmt)
    listed = [o.uri for o in storage.list_objects(str(tmp_path), extensions=EmbedConfig().extensions)]
    assert [uri.rsplit("/", 1)[1] for uri in listed] == ["a.avif", "b.jp2", "c.j2k", "d.jpg"]
    for uri in listed:
        decoded = decode_image(Path(uri).read_bytes())
        assert decoded.pixels.shape == source.shape
        assert np.abs(decoded.pixels.astype(int) - source).mean() < 12  # lossy, but the same picture
