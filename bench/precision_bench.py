"""bfloat16 against float32 CPU inference for BiT, in one run: speed, and how close the embeddings stay.

    python bench/precision_bench.py                       # R50x1 and R101x1, 224x224, batch 16
    python bench/precision_bench.py --archs tiny --iters 2 --warmup 1

For each architecture the same seeded random weights are built twice, under the ``float32`` and the
``mixed_bfloat16`` policy (as ``cpu_precision: bfloat16`` builds them in the embedding actor: float32
variables, Group Norm statistics and weight standardization in float32, bfloat16 convolutions), and run
like the actor runs them: uint8 pixels in, one traced ``tf.function``. The two take turns, one batch
each per round, so load from other processes hits them alike.

Closeness is measured on real photos (scikit-learn's and scikit-image's samples, resized to the model
size): the cosine of each photo's bfloat16 embedding to its float32 one, also after subtracting the
mean embedding of the photos (random-init BiT gives every photo a large common component, which makes
raw cosines look better than they are), and how much the photo-to-photo cosine matrix moves (what
nearest-neighbour search sees). Real BiT weights cannot be downloaded here: the figures are for a
random-init network, whose activations Group Norm keeps at unit scale as it does for trained ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import bitray  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

# isort: split
import numpy as np
import tensorflow as tf
import tf_keras
from photos import MICROSCOPY, sample_photos
from PIL import Image

from bitray.model.bit import build_bit
from bitray.precision import cpu_supports_bfloat16


def model_inputs(size: int) -> tuple[list[str], np.ndarray]:
    """The sample photos (``bench/photos.py``, with its microscopy images) resized to ``size``, as uint8."""
    photos = sample_photos(extra=MICROSCOPY)
    bilinear = Image.Resampling.BILINEAR
    resized = [np.asarray(Image.fromarray(p).resize((size, size), bilinear)) for p in photos.values()]
    return list(photos), np.stack(resized).astype(np.uint8)


def build(arch: str, policy: str, weights: list[np.ndarray] | None) -> tf_keras.Model:
    previous = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy(policy)
    try:
        model = build_bit(arch, seed=0)
    finally:
        tf_keras.mixed_precision.set_global_policy(previous)
    if weights is not None:
        model.set_weights(weights)
    return model


def forward_fn(model: tf_keras.Model):  # noqa: ANN201 - a tf.function, as EmbedActor traces it
    spec = tf.TensorSpec([None, None, None, 3], tf.uint8)
    return tf.function(
        lambda images: model(tf.cast(images, tf.float32) * (1 / 255), training=False), input_signature=[spec]
    )


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5, help="timed rounds (one batch per precision each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per model (tracing)")
    parser.add_argument("--archs", default="r50x1,r101x1")
    args = parser.parse_args()

    print(f"CPU bfloat16 support (avx512_bf16 / amx_bf16): {cpu_supports_bfloat16()}; {os.cpu_count()} CPUs")
    names, photos = model_inputs(args.size)
    print(f"{len(names)} photos: {', '.join(names)}")
    shape = (args.batch, args.size, args.size, 3)
    batch = tf.constant(np.random.default_rng(0).integers(0, 256, shape, np.uint8))
    for arch in (a.strip() for a in args.archs.split(",") if a.strip()):
        f32 = build(arch, "float32", None)
        bf16 = build(arch, "mixed_bfloat16", f32.get_weights())
        forwards = {"float32": forward_fn(f32), "bfloat16": forward_fn(bf16)}
        for forward in forwards.values():
            for _ in range(args.warmup):
                forward(batch).numpy()
        seconds: dict[str, list[float]] = {name: [] for name in forwards}
        for _ in range(args.iters):
            for name, forward in forwards.items():
                start = time.perf_counter()
                forward(batch).numpy()
                seconds[name].append(time.perf_counter() - start)
        rate = {name: args.batch / statistics.median(s) for name, s in seconds.items()}
        best = {name: args.batch / min(s) for name, s in seconds.items()}
        exact = forwards["float32"](photos).numpy()
        low = forwards["bfloat16"](photos).numpy()
        assert low.dtype == np.float32, low.dtype
        same = cosine_rows(low, exact)
        mean = exact.mean(0, keepdims=True)
        centred = cosine_rows(low - mean, exact - mean)
        others = unit(exact) @ unit(exact).T
        moved = np.abs(unit(low) @ unit(low).T - others).max()
        off_diagonal = others[~np.eye(len(names), dtype=bool)]
        print(
            f"\n{arch} {args.size}x{args.size} batch {args.batch}, {args.iters} rounds\n"
            f"  float32   median {rate['float32']:7.2f} img/s  best {best['float32']:7.2f}\n"
            f"  bfloat16  median {rate['bfloat16']:7.2f} img/s  best {best['bfloat16']:7.2f}\n"
            f"  bfloat16 / float32: median {rate['bfloat16'] / rate['float32']:.2f}x, "
            f"best {best['bfloat16'] / best['float32']:.2f}x\n"
            f"  cosine(bf16, f32) per photo: min {same.min():.5f}  mean {same.mean():.5f}\n"
            f"  the same, mean photo embedding subtracted: min {centred.min():.4f}  "
            f"mean {centred.mean():.4f}\n"
            f"  (cosine between different photos in float32: {off_diagonal.min():.4f} to "
            f"{off_diagonal.max():.4f})\n"
            f"  photo-to-photo cosine matrix, largest change: {moved:.5f}"
        )


if __name__ == "__main__":
    main()
