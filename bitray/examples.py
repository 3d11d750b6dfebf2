"""Example images for trying bitray: scikit-learn's digits (a labelled set for fine-tuning, ``bitray data
digits``) and scikit-image's sample photos (the embedding quickstart, ``bitray demo``)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bitray import storage as st
from bitray.config import StorageConfig


def iter_digits() -> Iterator[tuple[int, int, bytes]]:
    """``(index, digit, PNG bytes)`` for scikit-learn's 1,797 8x8 digits, scaled 0-16 -> 0-255."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for n, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = np.clip(np.round(image * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        yield n, int(target), buffer.getvalue()


def write_digits(output_uri: str, storage: StorageConfig | None = None) -> int:
    """Write the digits as ``<output>/<digit>/<n>.png``; returns how many images were written."""
    count = 0
    for n, digit, png in iter_digits():
        st.write_bytes(st.join(output_uri, str(digit), f"{n:04d}.png"), png, storage)
        count += 1
    return count


def write_sample_photos(directory: Path) -> Path:
    """Write scikit-image's bundled sample photos as JPEG and PNG files (idempotent)."""
    import skimage.data
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    names = [
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "camera",
        "coins",
        "moon",
        "page",
        "horse",
        "text",
        "grass",
        "gravel",
        "brick",
    ]
    for i, name in enumerate(names):
        try:
            pixels = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: S112 - a sample missing from this scikit-image version: skip it
            continue
        if pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
        suffix = "jpg" if i % 2 == 0 else "png"
        target = directory / f"{name}.{suffix}"
        if not target.exists():
            Image.fromarray(pixels.astype(np.uint8)).save(target)
    return directory
