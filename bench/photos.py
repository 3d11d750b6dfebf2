"""Real sample photos for the benchmarks: scikit-learn's two and scikit-image's colour photographs.

No download: both packages ship these files. Every photo comes back as RGB uint8.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

SKLEARN = ("china.jpg", "flower.jpg")
SKIMAGE = ("astronaut", "coffee", "chelsea", "rocket")
MICROSCOPY = ("immunohistochemistry", "retina")
"""Two more of scikit-image's colour images (not scenes), where the installed version has them."""


def sample_photos(extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The six colour photographs by name (427x640 to 512x512), plus those of ``extra`` that scikit-image
    ships in this version (some are fetched on first use, which cannot happen offline)."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    photos = {name.removesuffix(".jpg"): load_sample_image(name) for name in SKLEARN}
    photos.update({name: getattr(data, name)() for name in SKIMAGE})
    for name in extra:
        try:
            pixels = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001, S112 - missing in this version, or not downloadable offline
            continue
        if pixels.ndim == 3 and pixels.shape[-1] == 3:
            photos[name] = pixels
    return photos


def jpeg(pixels: np.ndarray | Image.Image, quality: int = 90) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def resized(pixels: np.ndarray, size_wh: tuple[int, int]) -> Image.Image:
    """A photo at ``size_wh`` (bicubic; upscaled photos stand in for camera-sized files)."""
    return Image.fromarray(pixels).convert("RGB").resize(size_wh, Image.Resampling.BICUBIC)


def varied_jpegs(n: int, sizes_wh: list[tuple[int, int]], seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEGs, cycling through ``sizes_wh``: random crops of the sample photos, mirrored at
    random, with a colour shift and a little noise, so that no two files are the same."""
    bases = list(sample_photos().values())
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = Image.fromarray(bases[i % len(bases)])
        w, h = base.size
        cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size_wh = sizes_wh[i % len(sizes_wh)]
        image = base.crop((x, y, x + cw, y + ch)).resize(size_wh, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        noise = rng.normal(0, 2, (image.height, image.width, 1)) + rng.integers(-12, 13, size=3)
        pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
        out.append(jpeg(pixels))
    return out
