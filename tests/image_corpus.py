"""The bad and odd image corpus of issue 3 (item 6): every file a bucket of "images" can really hold.

Each item is a file name, its bytes, and the outcome bitray must give it: ``"embedded"`` (one embedding
row) or ``"error"`` (one error row whose reason contains ``reason``). The pictures are small (longest side
96 px) versions of scikit-image's sample photos, so a corpus run with a tiny model takes seconds.

    from image_corpus import corpus, write_local, upload_s3, EXPECTED   # tests/ is on sys.path under pytest

    items = corpus()                       # {name: CorpusItem(name, data, expected, reason, ...)}
    write_local(tmp_path / "in")           # every item as a file; returns {name: Path}
    upload_s3(boto3_client, "bucket", "in/")   # every item as an object (+ a directory marker); returns keys
    EXPECTED["truncated.jpg"]              # "error"

``DIRECTORY_MARKER`` (a zero-byte key ending in "/", as the S3 console creates for a folder) is uploaded by
``upload_s3`` too: it is not an image and must not count as an input at all (``storage.list_objects`` skips
it), so it is not in ``corpus()``.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

DIRECTORY_MARKER = "a folder/"
LONG_SIDE = 96


@dataclass(frozen=True)
class CorpusItem:
    name: str  # file name / object key (relative); may hold spaces and non-ASCII characters
    data: bytes
    expected: str  # "embedded" or "error"
    reason: str = ""  # for errors: a substring of the readable reason (lower case)
    shape: tuple[int, int] | None = None  # for embedded: decoded pixel (height, width), orientation applied
    stored_size: tuple[int, int] | None = None  # for embedded: (width, height) as stored in the file
    note: str = ""


# --- base pictures ---------------------------------------------------------------------------------------


def _small(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = LONG_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


@functools.cache
def photo(name: str = "chelsea") -> np.ndarray:
    """A scikit-image sample photo, longest side 96 px: uint8 RGB (or L for 'camera')."""
    return _small(getattr(skdata, name)())


def encode(pixels: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG assembled chunk by chunk (valid CRCs), for what Pillow cannot write."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)  # deflate, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` RGB pixels, with one tiny IDAT: a few dozen bytes.

    A decompression bomb as far as the header goes; the pixel data would never decode, but a decoder that
    allocates from the header (4.8 GB for 40000x40000) fails before it gets that far.
    """
    return _png(width, height, 8, 2, zlib.compress(b"\0" * 64))


def png_bomb(width: int, height: int) -> bytes:
    """A real, valid 16-bit RGBA PNG of ``width`` x ``height`` transparent zeros: about 1/1000 of its pixel
    count in bytes (600 KB for 9000x9000), but decoding it through RGBA compositing takes gigabytes."""
    row = b"\0" * (width * 8 + 1)  # filter byte, then 4 samples of 2 bytes per pixel
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return _png(width, height, 16, 6, idat)


def rgb16() -> np.ndarray:
    """16-bit RGB: the coffee photo times 257, with 65535 and 32768 in the first pixel."""
    rgb = photo("coffee").astype(np.uint16) * 257
    rgb[0, 0] = (65535, 32768, 0)
    return rgb


def png16(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one): rows of big-endian samples, filter type 0."""
    h, w, _ = rgb.shape
    rows = np.concatenate(
        [np.zeros((h, 1), np.uint8), rgb.astype(">u2").view(np.uint8).reshape(h, -1)], axis=1
    )
    return _png(w, h, 16, 2, zlib.compress(rows.tobytes()))


# --- the items -------------------------------------------------------------------------------------------


def _embedded(
    name: str, data: bytes, image_hw: tuple[int, int], note: str, *, rotated: bool = False
) -> CorpusItem:
    h, w = image_hw
    shape = (w, h) if rotated else (h, w)
    return CorpusItem(name, data, "embedded", shape=shape, stored_size=(w, h), note=note)


def _alpha_photo() -> np.ndarray:
    rgb = photo("astronaut")
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, : rgb.shape[1] // 4] = 0  # left quarter fully transparent -> white after compositing
    alpha[:, rgb.shape[1] // 4 : rgb.shape[1] // 2] = 128
    return np.dstack([rgb, alpha])


def grey16() -> np.ndarray:
    """16-bit greyscale: the camera photo scaled to 0..65535, with 65535 and 32768 in the first row."""
    grey = photo("camera").astype(np.uint16) * 257
    grey[0, 0], grey[0, 1] = 65535, 32768
    return grey


def exif_rotated_jpeg() -> bytes:
    """The chelsea photo stored landscape with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo("chelsea"), "JPEG", quality=90, exif=exif.tobytes())


def cmyk_source() -> np.ndarray:
    return photo("coffee")


def _animated(fmt: str) -> bytes:
    first = photo("chelsea")
    frames = [Image.fromarray(f) for f in (first, 255 - first, np.zeros_like(first))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _palette_transparent() -> bytes:
    image = Image.fromarray(photo("coffee")).quantize(64)
    image.info["transparency"] = 0  # palette index 0 transparent
    return encode(image, "PNG", transparency=0)


_BUILDERS: list[Callable[[], CorpusItem]] = [
    lambda: CorpusItem("empty.jpg", b"", "error", reason="empty file", note="zero bytes"),
    lambda: CorpusItem(
        "truncated.jpg",
        (j := encode(photo("chelsea"), "JPEG"))[: len(j) // 2],
        "error",
        reason="truncated",
        note="first half of a JPEG",
    ),
    lambda: CorpusItem(
        "truncated.png",
        (p := encode(photo("coffee"), "PNG"))[: len(p) * 2 // 3],
        "error",
        reason="truncated",
        note="first two thirds of a PNG",
    ),
    lambda: CorpusItem(
        "random bytes.jpg",
        np.random.default_rng(0).bytes(4096),
        "error",
        reason="not an image",
        note="4 KiB of random bytes named .jpg",
    ),
    lambda: CorpusItem(
        "not-found.png",
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n",
        "error",
        reason="not an image (starts with '<!doctype html",
        note="an HTML error page saved as .png",
    ),
    lambda: CorpusItem(
        "notes.png",
        b"Just some notes, not a picture.\n",
        "error",
        reason="not an image (starts with 'just",
        note="plain text named .png",
    ),
    lambda: CorpusItem(
        "bomb-40000x40000.png",
        png_header_only(40000, 40000),
        "error",
        reason="over the limit",
        note="PNG header declaring 40000x40000 RGB (4.8 GB decoded), a few dozen bytes on disk",
    ),
    lambda: _embedded(
        "alpha.png",
        encode(_alpha_photo(), "PNG"),
        photo("astronaut").shape[:2],
        "RGBA, left quarter transparent",
    ),
    lambda: _embedded(
        "grey-alpha.png",
        encode(np.dstack([photo("camera"), photo("camera")]), "PNG"),
        photo("camera").shape[:2],
        "LA (grey + alpha)",
    ),
    lambda: _embedded(
        "grey16.png",
        encode(Image.fromarray(grey16()), "PNG"),
        photo("camera").shape[:2],
        "16-bit greyscale PNG (I;16)",
    ),
    lambda: _embedded("rgb16.png", png16(rgb16()), photo("coffee").shape[:2], "16-bit RGB PNG"),
    lambda: _embedded(
        "grey.jpg", encode(photo("camera"), "JPEG"), photo("camera").shape[:2], "8-bit greyscale"
    ),
    lambda: _embedded(
        "palette.png",
        encode(Image.fromarray(photo("chelsea")).quantize(32), "PNG"),
        photo("chelsea").shape[:2],
        "palette (P)",
    ),
    lambda: _embedded(
        "palette-transparent.png",
        _palette_transparent(),
        photo("coffee").shape[:2],
        "palette with a transparent index",
    ),
    lambda: _embedded(
        "cmyk.jpg",
        encode(Image.fromarray(cmyk_source()).convert("CMYK"), "JPEG", quality=95),
        cmyk_source().shape[:2],
        "CMYK JPEG",
    ),
    lambda: _embedded(
        "exif-rotated.jpg",
        exif_rotated_jpeg(),
        photo("chelsea").shape[:2],
        "EXIF orientation 6: stored landscape, displayed portrait",
        rotated=True,
    ),
    lambda: _embedded("one-pixel.png", encode(np.array([[[200, 30, 60]]], np.uint8), "PNG"), (1, 1), "1x1"),
    lambda: _embedded(
        "animated.gif", _animated("GIF"), photo("chelsea").shape[:2], "3 frames: first is the photo"
    ),
    lambda: _embedded("animated.webp", _animated("WEBP"), photo("chelsea").shape[:2], "3 frames, WebP"),
    lambda: _embedded(
        "photo.webp", encode(photo("coffee"), "WEBP", quality=90), photo("coffee").shape[:2], "lossy WebP"
    ),
    lambda: _embedded("photo.tiff", encode(photo("astronaut"), "TIFF"), photo("astronaut").shape[:2], "TIFF"),
    lambda: _embedded("photo.bmp", encode(photo("coffee"), "BMP"), photo("coffee").shape[:2], "BMP"),
    lambda: _embedded(
        "name with spaces.jpg",
        encode(photo("astronaut"), "JPEG"),
        photo("astronaut").shape[:2],
        "spaces in the key",
    ),
    lambda: _embedded(
        "ünïcödé photo 写真.jpg", encode(photo("coffee"), "JPEG"), photo("coffee").shape[:2], "non-ASCII key"
    ),
    lambda: _embedded(
        "nested/deeper/UPPER CASE.JPG",
        encode(photo("chelsea"), "JPEG"),
        photo("chelsea").shape[:2],
        "nested prefix, upper-case extension",
    ),
]


@functools.cache
def _corpus() -> tuple[CorpusItem, ...]:
    return tuple(build() for build in _BUILDERS)


def corpus() -> dict[str, CorpusItem]:
    """Every corpus item by name (built once per process, deterministic bytes)."""
    return {item.name: item for item in _corpus()}


def corpus_bytes() -> dict[str, bytes]:
    return {item.name: item.data for item in _corpus()}


EXPECTED: dict[str, str] = {item.name: item.expected for item in _corpus()}
"""name -> "embedded" or "error"."""


def write_local(directory: str | Path) -> dict[str, Path]:
    """Write every item under ``directory`` (sub-folders created); returns name -> path."""
    root = Path(directory)
    paths = {}
    for item in _corpus():
        path = root / item.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item.data)
        paths[item.name] = path
    return paths


def upload_s3(client, bucket: str, prefix: str = "", *, directory_marker: bool = True) -> dict[str, str]:  # noqa: ANN001
    """Upload every item to ``s3://bucket/prefix<name>`` with a boto3 S3 ``client``; returns name -> key.

    With ``directory_marker`` it also puts the zero-byte ``prefix + DIRECTORY_MARKER`` key, which a listing
    must skip (not an input, not an error).
    """
    keys = {}
    for item in _corpus():
        key = f"{prefix}{item.name}"
        client.put_object(Bucket=bucket, Key=key, Body=item.data)
        keys[item.name] = key
    if directory_marker:
        client.put_object(Bucket=bucket, Key=f"{prefix}{DIRECTORY_MARKER}", Body=b"")
    return keys
