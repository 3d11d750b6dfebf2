"""Image bytes -> RGB pixels for BiT: decode with Pillow, normalise every mode to RGB uint8, resize.

Decode decisions (the same for embedding and fine-tuning, so a model sees the same pixels in both):

- EXIF orientation is applied (``ImageOps.exif_transpose``); ``width``/``height`` report the size as stored,
  before rotation. Unreadable EXIF metadata does not reject a photo: it is decoded unrotated.
- Every mode becomes RGB uint8. Transparency (RGBA, LA, PA, palette or RGB with a transparent colour) is
  composited onto white, as a browser shows it on a white page. 16-bit greyscale is scaled to 8 bits by
  rounding ``v / 257`` (65535 -> 255, 32768 -> 128), never clipped; 16-bit colour PNGs keep their high
  byte (Pillow's decoder). 32-bit float images are taken as [0, 1] when they fit in it, else clipped to
  [0, 255] like Pillow's own conversion. CMYK uses Pillow's conversion (embedded ICC profiles are ignored).
- Formats: JPEG (and MPO), PNG, GIF, WebP, TIFF, BMP, AVIF, JPEG 2000 (``FORMATS``); anything else is
  "not an image".
- Animations (GIF, WebP, APNG) and multi-page files (TIFF) give their first frame.
- Decompression bombs: the pixel count declared in the header is checked against ``max_pixels`` before
  any pixel is decoded. Pillow's own limit (``Image.MAX_IMAGE_PIXELS``) is process-global, so bitray does not
  rely on it; it stays as a backstop for headers over twice that limit, and is raised to ``max_pixels`` when a
  caller asks for more than it (never lowered).
- Decode memory: what decoding one image would allocate is estimated from its header (pixels to decode x
  bytes per pixel of its mode, plus the copies of the conversion to RGB; ``decode_bytes_estimate``) and
  checked against ``max_decode_bytes`` before any pixel is decoded. The pixel limit alone does not bound
  memory: a 2 MB PNG of 90 megapixels of transparent zeros passes it and would take about 2.3 GB.
- Truncated data is an error (Pillow's ``LOAD_TRUNCATED_IMAGES`` stays False): a half-grey photo must not
  be embedded as if it were whole.

``resize_for_model`` resizes straight to the model's input size (no crop, aspect ratio not kept), as BiT
evaluates, with Pillow's bilinear filter. Pillow widens the filter support when it downscales, so this is
an antialiased (triangle-filter) resize; it runs on uint8 in Pillow's SIMD code, then scales to [0, 1].

``prepare_for_model`` (what the embedding pipeline feeds the model) decodes fast by default: JPEGs at the
smallest DCT scale (1/2, 1/4, 1/8) keeping both sides at least the target's larger side, and every image
box-reduced by an integer factor (``Image.reduce``, via Pillow's ``reducing_gap``) while it stays at least
``REDUCING_GAP`` times the target before the antialiased resize. Its pixels differ from the full-resolution
decode by about 1/255 on average (README, "Decode choice"); ``exact=True`` decodes at full resolution.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from bitray.errors import BitrayError

DEFAULT_MAX_PIXELS = 100_000_000
"""100 megapixels (300 MB as RGB uint8): larger than any common camera's photos except 108/200 MP phones."""

DEFAULT_MAX_DECODE_MB = 1200
DEFAULT_MAX_DECODE_BYTES = DEFAULT_MAX_DECODE_MB * 2**20
"""What decoding one image may allocate (``decode_bytes_estimate``): 1200 MB. A 100 MP 8-bit RGB photo, the
largest the pixel limit lets through, needs about 1050 MB at full resolution (4 bytes per pixel as Pillow
holds RGB, 4 more for an EXIF rotation, 3 for the RGB array) and so still decodes in ``exact`` mode; a
transparent or 16-bit greyscale image needs 26-27 bytes per pixel through the conversion to RGB, so such
images over about 46 MP (a small PNG can declare them) are refused instead of taking 1.2-2.7 GB each.
A decode task reserves this much memory from Ray, so it also sets how many decode tasks share a node."""

REDUCING_GAP = 2.0
"""Fast decode: the box reduction keeps at least twice the target size for the antialiased resize, which
halves a 2000x1500 -> 224x224 resize with a mean difference of 0.3/255 (gap 1: 3.6x, 1.1/255)."""

FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "AVIF", "JPEG2000")
"""What ``decode_image`` opens (JPEG includes MPO). Formats with weak signatures (TGA) could take random
bytes for pixels, and EPS would run Ghostscript on untrusted input, so Pillow's other formats are refused."""

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageDecodeError(BitrayError):
    """The bytes are not an image bitray can decode; the message is a short readable reason."""


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8 [h, w, 3], RGB, EXIF orientation applied (smaller if decoded with min_size)
    width: int  # as stored in the file, before orientation
    height: int
    format: str  # Pillow's format name: "JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", ...


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: tuple[int, int] | None = None,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> DecodedImage:
    """Decode encoded image bytes to RGB uint8 pixels; raise ``ImageDecodeError`` with a readable reason.

    ``min_size=(h, w)``: the caller only needs that many pixels (it resizes to them next), so a JPEG may
    be decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling while both sides stay at least
    ``max(h, w)``. A 12 MP photo then decodes about 10x faster. ``pixels`` is smaller than ``width`` x
    ``height`` in that case; ``max_pixels`` still applies to the stored size, ``max_decode_bytes`` to
    what is decoded (see ``decode_bytes_estimate``).
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # someone else in the process may have flipped it
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # only ever raised, and only when a caller asks for more
    try:
        with warnings.catch_warnings():
            # The check below decides; Pillow's warning would only be noise in worker logs.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image ({_describe_start(data)})") from None
    except Image.DecompressionBombError as exc:
        # Pillow's backstop fired first (header over twice its limit): it only tells the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found[1]):.2g}" if found else "too many"
        raise ImageDecodeError(_too_large(size, max_pixels)) from None
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise ImageDecodeError(_reason(_what_failed(exc, "image header"), exc)) from None

    fmt = image.format or "unknown"
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(_too_large(f"{width}x{height} = {width * height:.2g}", max_pixels))
    if min_size is not None:
        side = max(min_size)  # orientation may swap the sides after decoding
        image.draft(None, (side, side))  # only JPEG implements it; a no-op for other formats
    needed = decode_bytes_estimate(image)  # the size (and mode) the draft will decode to
    if needed > max_decode_bytes:
        decoded_w, decoded_h = image.size
        raise ImageDecodeError(
            f"decoding {decoded_w}x{decoded_h} {image.mode} pixels needs about {needed / 2**20:.0f} MB, over "
            f"the decode-memory budget of {max_decode_bytes / 2**20:.0f} MB; raise max_decode_mb if intended"
        )
    try:
        image.load()  # the first frame of an animation; raises on truncated data
    except MemoryError:
        raise
    except Exception as exc:  # anything Pillow raises on bad data becomes a readable reason
        raise ImageDecodeError(_reason(_what_failed(exc, f"{fmt} data"), exc)) from None

    try:
        image = ImageOps.exif_transpose(image)
    except MemoryError:
        raise
    except Exception:  # bad EXIF must not reject good pixels (see module docstring)
        pass
    try:
        pixels = _to_rgb(image)
    except MemoryError:
        raise
    except Exception as exc:  # e.g. a mode Pillow cannot convert to RGB
        raise ImageDecodeError(_reason(f"cannot convert {fmt} mode {image.mode} to RGB", exc)) from None
    return DecodedImage(pixels=pixels, width=width, height=height, format=fmt)


def decode_bytes_estimate(image: Image.Image) -> int:
    """Bytes that decoding ``image`` (opened, not loaded) to an RGB array allocates, from its header.

    Pillow holds 1-band 8-bit modes in 1 byte per pixel, 16-bit ones in 2 and every other mode (RGB
    included) in 4. On top: a copy of that for an EXIF rotation (counted always: a PNG's orientation is
    only known after decoding) and the conversion's own copies (``_CONVERSION_BYTES``). A sum of
    allocations, so an upper bound on the peak; the codecs' own buffers are small next to it.
    """
    width, height = image.size
    mode = image.mode
    stored = _stored_bytes_per_pixel(mode)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        convert = _CONVERSION_BYTES["alpha"]
    elif mode in ("I", "F") or mode.startswith("I;16"):
        convert = stored + _CONVERSION_BYTES[mode[0]]
    else:
        convert = _CONVERSION_BYTES["RGB" if mode == "RGB" else "other"]
    return width * height * (2 * stored + convert)


_CONVERSION_BYTES = {
    "RGB": 3,  # the array
    "other": 4 + 3,  # convert("RGB"), the array
    "alpha": 4 + 4 + 4 + 4 + 3,  # convert("RGBA"), white background, composite, convert("RGB"), the array
    "I": 4 + 4 + 4 + 4 + 1 + 3,  # (after the array) float32, clip, / 257, rint, uint8, 3 bands
    "F": 1 + 4 + 4 + 4 + 4 + 4 + 1 + 3,  # finite mask and values, * 255, nan_to_num, rint, clip, uint8, bands
}
"""Bytes per pixel that ``_to_rgb`` allocates for each kind of mode, beyond the decoded image."""


def _stored_bytes_per_pixel(mode: str) -> int:
    if mode.startswith("I;16"):
        return 2
    if mode in ("I", "F"):
        return 4
    return 1 if Image.getmodebands(mode) == 1 else 4  # 2-4 bands are held in 4 bytes


def resize_for_model(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize RGB uint8 ``[h, w, 3]`` straight to ``size = (height, width)``; float32 in [0, 1]."""
    return resize_pixels(pixels, size).astype(np.float32) * np.float32(1 / 255)


def resize_pixels(
    pixels: np.ndarray, size: tuple[int, int], *, reducing_gap: float | None = None
) -> np.ndarray:
    """The resize of ``resize_for_model``, kept as uint8 (4x smaller to ship between processes).

    ``resize_pixels(p, s) / 255`` equals ``resize_for_model(p, s)`` up to float32 rounding.
    ``reducing_gap``: box-reduce by an integer factor first while at least that many times ``size`` is
    kept (Pillow's ``Image.reduce``; faster, close but not equal); ``None`` resizes in one step.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 pixels [h, w, 3], got {pixels.dtype} {pixels.shape}")
    out_h, out_w = size
    if (pixels.shape[0], pixels.shape[1]) == (out_h, out_w):
        return pixels
    image = Image.fromarray(pixels)
    return np.asarray(image.resize((out_w, out_h), Image.Resampling.BILINEAR, reducing_gap=reducing_gap))


def prepare_for_model(
    data: bytes,
    size: tuple[int, int],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    exact: bool = False,
) -> tuple[np.ndarray, int, int]:
    """Encoded bytes -> (uint8 ``[h, w, 3]`` at ``size``, stored width, stored height): what the embedding
    pipeline and its benchmark feed the model (which scales to [0, 1] itself).

    Fast by default (DCT-scaled JPEG decode, integer box reduction, see the module docstring);
    ``exact=True`` decodes at full resolution and resizes in one step, the pixels of ``decode_image``
    then ``resize_pixels``.
    """
    decoded = decode_image(
        data, max_pixels=max_pixels, min_size=None if exact else size, max_decode_bytes=max_decode_bytes
    )
    gap = None if exact else REDUCING_GAP
    return resize_pixels(decoded.pixels, size, reducing_gap=gap), decoded.width, decoded.height


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image).astype(np.float32)  # "I" from a PNG/TIFF holds 16-bit values too
        grey = np.rint(np.clip(values, 0, 65535) / 257).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.asarray(image)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
        grey = np.rint(np.clip(np.nan_to_num(values), 0, 255)).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def _describe_start(data: bytes) -> str:
    """'starts with '<!DOCTYPE html'' for text, the first bytes in hex otherwise."""
    head = data[:16]
    text = ""
    for end in range(len(head), max(len(head) - 4, 0), -1):  # do not cut a UTF-8 character in two
        try:
            text = head[:end].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    if text and all(ch.isprintable() or ch.isspace() for ch in text):
        return f"starts with {text.strip()!r}"
    return f"{len(data)} bytes starting {head[:8].hex(' ')}"


def _too_large(size: str, max_pixels: int) -> str:
    return f"image is {size} pixels, over the limit of {max_pixels:.2g}; raise max_pixels if this is intended"


def _what_failed(exc: Exception, what: str) -> str:
    truncated = isinstance(exc, EOFError) or "truncated" in str(exc).lower()
    return f"truncated {what}" if truncated else f"corrupt {what}"


def _reason(prefix: str, exc: Exception) -> str:
    message = str(exc).strip()
    return f"{prefix} ({message})" if message else f"{prefix} ({type(exc).__name__})"
