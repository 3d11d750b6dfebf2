"""HyperRule augmentation on the training worker (numpy): random crop and flip, MixUp, evaluation scaling."""

from __future__ import annotations

import numpy as np


def random_crop_flip(
    images: np.ndarray, crop: int, rng: np.random.Generator, index: np.ndarray | None = None
) -> np.ndarray:
    """Random ``crop`` x ``crop`` window and random horizontal flip per image; uint8 in, float [0,1] out.

    ``index`` picks the images (``images[index]``, repeats allowed) in the same gather that crops them.
    A constant number of numpy calls per batch, none per image.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    picked = np.arange(len(images)) if index is None else np.asarray(index)
    n, height, width = len(picked), images.shape[1], images.shape[2]
    tops = rng.integers(0, height - crop + 1, size=n)
    lefts = rng.integers(0, width - crop + 1, size=n)
    flips = rng.random(n) < 0.5
    windows = sliding_window_view(images, (crop, crop), axis=(1, 2))  # [N, h', w', 3, crop, crop], a view
    out = windows[picked, tops, lefts].transpose(0, 2, 3, 1)  # one gather: [n, crop, crop, 3]
    out = np.where(flips[:, None, None, None], out[:, :, ::-1], out)
    return out.astype(np.float32) * np.float32(1 / 255)


def mixup(
    images: np.ndarray, onehot: np.ndarray, alpha: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """MixUp with one lambda ~ Beta(alpha, alpha) for the whole batch; identity when ``alpha`` is 0."""
    if alpha <= 0:
        return images, onehot
    lam = float(rng.beta(alpha, alpha))
    perm = rng.permutation(len(images))
    return lam * images + (1 - lam) * images[perm], lam * onehot + (1 - lam) * onehot[perm]


def eval_images(images: np.ndarray) -> np.ndarray:
    """Validation rows are already resized straight to the crop size; only scale to [0, 1]."""
    return images.astype(np.float32) / 255.0
