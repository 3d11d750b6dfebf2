"""How much ``decode: fast`` changes what the model sees, against ``decode: exact``, on real photos.

    python bench/decode_bench.py                 # R50x1, random-init weights (seeded), 224 px
    python bench/decode_bench.py --arch r101x1
    python bench/decode_bench.py --model npz:BiT-M-R50x1.npz    # real weights, where they can be fetched

scikit-learn's two sample photos and four of scikit-image's, each saved as a JPEG (quality 90) at about
camera size (2000x1500, upscaled) and at web size (500x375). For each file and both decodes
(``bitray.images.prepare_for_model``, ``exact`` False/True):

  - the model-free figure: mean and max absolute difference of the 224x224 uint8 inputs (of 255);
  - the cosine similarity of the two embeddings (random-init weights: real BiT weights cannot be
    downloaded here; the same seed every run);
  - for scale, the same two figures for re-encoding the file once more as JPEG quality 90 and decoding
    it exactly: a difference every re-uploaded photo already has.
Also the decode time per image of both, on one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from photos import jpeg, resized, sample_photos

import bitray  # noqa: F401  (before TensorFlow: selects Keras 2)
from bitray.images import decode_image, prepare_for_model

SIZES_WH = {"2000x1500": (2000, 1500), "500x375": (500, 375)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="r50x1", help="BiT variant, random-init weights")
    p.add_argument("--model", default=None, help="a model spec instead (e.g. npz:BiT-M-R50x1.npz)")
    p.add_argument("--size", type=int, default=224, help="model input size (square)")
    return p.parse_args(argv)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _timed(data: bytes, size: tuple[int, int], exact: bool, repeat: int = 5) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        prepare_for_model(data, size, exact=exact)
    return (time.perf_counter() - start) / repeat * 1000


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bitray.model import load_model

    size = (args.size, args.size)
    loaded = load_model(args.model or f"random:{args.arch}")
    forward = loaded.inference_function()

    def embed(pixels: np.ndarray) -> np.ndarray:
        return np.asarray(forward(pixels.astype(np.float32)[None] * np.float32(1 / 255)))[0]

    rows = []
    for name, photo in sample_photos().items():
        for label, size_wh in SIZES_WH.items():
            data = jpeg(resized(photo, size_wh))
            fast = prepare_for_model(data, size)[0]
            exact = prepare_for_model(data, size, exact=True)[0]
            again = prepare_for_model(jpeg(decode_image(data).pixels), size, exact=True)[0]
            emb_exact = embed(exact)
            rows.append(
                {
                    "photo": name,
                    "size": label,
                    "pixel_mean_abs": float(np.abs(fast.astype(np.int16) - exact).mean()),
                    "pixel_max_abs": int(np.abs(fast.astype(np.int16) - exact).max()),
                    "cosine": _cosine(embed(fast), emb_exact),
                    "reencode_pixel_mean_abs": float(np.abs(again.astype(np.int16) - exact).mean()),
                    "reencode_cosine": _cosine(embed(again), emb_exact),
                    "ms_fast": _timed(data, size, exact=False),
                    "ms_exact": _timed(data, size, exact=True),
                }
            )
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in rows[-1].items()}))
    print(f"\nbench: {loaded.model_id} at {args.size} px, fast vs exact decode (pixels of 255)")
    for label in SIZES_WH:
        part = [r for r in rows if r["size"] == label]
        mean = {k: float(np.mean([r[k] for r in part])) for k in part[0] if k not in ("photo", "size")}
        worst_pixel, worst_cosine = max(r["pixel_max_abs"] for r in part), min(r["cosine"] for r in part)
        print(
            f"  {label:>9}: pixels mean |d| {mean['pixel_mean_abs']:.3f} (max {worst_pixel}), "
            f"cosine mean {mean['cosine']:.6f} min {worst_cosine:.6f}; re-encoding q90: pixels "
            f"{mean['reencode_pixel_mean_abs']:.3f}, cosine {mean['reencode_cosine']:.6f}; "
            f"decode {mean['ms_fast']:.1f} ms fast vs {mean['ms_exact']:.1f} ms exact"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
