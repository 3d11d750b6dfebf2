"""Forward throughput of bitray's BiT feature extractors next to Keras' ResNet101V2, in one run.

    python bench/model_bench.py                 # 224x224, batch 16, R50x1 and R101x1
    python bench/model_bench.py --iters 3 --warmup 1 --archs r101x1 --variants plain,folded

Variants: ``plain`` (weight standardization on every call, as trained), ``folded`` (kernels standardized
once: a pure function of the weights, for inference), and ``+xla`` of each (``jit_compile=True``).
Group Norm choices (``--gn``): ``fused`` (bitray's default: each ReLU fused with the Group Norm scale and
offset by XLA, one pass over the activations) and ``unfused`` (a separate ReLU layer: three passes).
Every model runs inside one ``tf.function``. Models take turns, one batch each per round, so load from
other processes hits them alike; the table gives the median and the best round, in images/s and as a
ratio to ResNet101V2, and images per CPU-second of the whole process (least distorted by load).
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

from bitray.model.bit import build_bit, fold_weight_standardization

VARIANTS = ("plain", "folded", "plain+xla", "folded+xla")


def forward_fn(model: tf_keras.Model, xla: bool):  # noqa: ANN201 - a tf.function
    def call(batch: tf.Tensor) -> tf.Tensor:
        return model(batch, training=False)

    return tf.function(call, jit_compile=xla)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=10, help="timed rounds (one batch per model each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per model (tracing, XLA)")
    parser.add_argument("--archs", default="r50x1,r101x1")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--gn", default="fused,unfused", help="Group Norm + ReLU: fused, unfused or both")
    args = parser.parse_args()

    images = tf.constant(np.random.default_rng(0).random((args.batch, args.size, args.size, 3), np.float32))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    candidates: dict[str, tuple[tf_keras.Model, bool]] = {}
    baseline = tf_keras.applications.ResNet101V2(weights=None, include_top=False, pooling="avg")
    candidates["keras ResNet101V2"] = (baseline, False)
    if any(v.endswith("+xla") for v in variants):
        candidates["keras ResNet101V2 +xla"] = (baseline, True)
    gn_choices = [g.strip() for g in args.gn.split(",") if g.strip()]
    for arch in (a.strip() for a in args.archs.split(",") if a.strip()):
        for gn in gn_choices:
            if gn not in ("fused", "unfused"):
                parser.error(f"--gn takes fused and/or unfused, not {gn!r}")
            fused = gn == "fused"
            plain = build_bit(arch, fuse_gn_relu=fused)
            folded = (
                fold_weight_standardization(build_bit(arch, fuse_gn_relu=fused))
                if any(v.startswith("fold") for v in variants)
                else None
            )
            for variant in variants:
                model = folded if variant.startswith("folded") else plain
                suffix = "" if gn == "fused" else " unfused-gn"
                candidates[f"bitray {arch} {variant}{suffix}"] = (model, variant.endswith("+xla"))

    forwards = {name: forward_fn(model, xla) for name, (model, xla) in candidates.items()}
    for name, forward in forwards.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            forward(images).numpy()
        print(f"  warmed up {name} ({time.perf_counter() - start:.1f} s)", flush=True)
    # Round robin, one batch per model per round: load from other processes on a shared machine hits
    # every model alike, and the best round shows what each can do when the CPU is free.
    seconds: dict[str, list[float]] = {name: [] for name in forwards}
    cpu_seconds: dict[str, float] = dict.fromkeys(forwards, 0.0)
    for _ in range(args.iters):
        for name, forward in forwards.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            forward(images).numpy()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name] += time.process_time() - cpu_start

    def rate(values: list[float], pick) -> float:  # noqa: ANN001
        return args.batch / pick(values)

    baseline_seconds = seconds["keras ResNet101V2"]
    base = {"median": rate(baseline_seconds, statistics.median), "best": rate(baseline_seconds, min)}
    print(
        f"\nforward throughput, {args.size}x{args.size}, batch {args.batch}, {args.iters} rounds, "
        f"{os.cpu_count()} CPUs seen"
    )
    # images per CPU-second (all threads): what a busy machine distorts least
    per_cpu = {name: args.iters * args.batch / cpu for name, cpu in cpu_seconds.items()}
    base_cpu = per_cpu["keras ResNet101V2"]
    columns = ("median img/s", "ratio", "best img/s", "ratio", "img/cpu-s", "ratio")
    print(f"{'model':40}" + "".join(f" {c:>12}" for c in columns))
    for name, values in seconds.items():
        median, best = rate(values, statistics.median), rate(values, min)
        cells = (
            f"{median:.2f}",
            f"{median / base['median']:.2f}x",
            f"{best:.2f}",
            f"{best / base['best']:.2f}x",
            f"{per_cpu[name]:.2f}",
            f"{per_cpu[name] / base_cpu:.2f}x",
        )
        print(f"{name:40}" + "".join(f" {c:>12}" for c in cells))


if __name__ == "__main__":
    main()
