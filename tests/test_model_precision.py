"""bfloat16 compute with float32 statistics: close to float32, Group Norm and WS exact where it matters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from bitray.errors import BitrayError
from bitray.model.bit import GroupNorm, StandardizedConv2D, build_bit, standardize_kernel
from bitray.precision import builds_model, check_cpu_precision, cpu_flags, require_cpu_bfloat16


@contextmanager
def policy(name: str) -> Iterator[None]:
    previous = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        tf_keras.mixed_precision.set_global_policy(previous)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_bfloat16_tiny_model_is_close_to_float32_and_gives_float32_features() -> None:
    exact = build_bit("tiny")
    with policy("mixed_bfloat16"):
        low = build_bit("tiny")
    low.set_weights(exact.get_weights())
    assert low.get_layer("block1/unit01/b/standardized_conv2d").compute_dtype == "bfloat16"
    assert all(w.dtype == tf.float32 for w in low.weights)  # the variables stay float32
    images = np.random.default_rng(3).random((6, 64, 64, 3), np.float32)
    got, expected = low(images).numpy(), exact(images).numpy()
    assert got.dtype == np.float32
    # bench/precision_bench.py measured min 0.9991 on photos for tiny at 64 px: a bound with margin
    assert cosine(got, expected).min() > 0.995
    assert not np.array_equal(got, expected)  # bfloat16 really ran


def test_group_norm_statistics_are_float32_under_bfloat16() -> None:
    # Activations on a large offset: exact in bfloat16 (steps of 0.5 between 64 and 128), but a bfloat16
    # mean (100.25 -> 100.0 or 100.5) shifts every output by about half a standard deviation.
    rng = np.random.default_rng(0)
    x = (100 + 0.5 * rng.integers(0, 4, (2, 8, 8, 64))).astype(np.float32)
    reference = GroupNorm()(x).numpy()
    with policy("mixed_bfloat16"):
        layer = GroupNorm()
        got = layer(tf.constant(x, tf.bfloat16))
    assert got.dtype == tf.bfloat16 and layer.gamma.dtype == tf.float32
    # only the final bfloat16 rounding of outputs of about unit size remains
    np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), reference, atol=0.02)


def test_weight_standardization_is_float32_under_bfloat16() -> None:
    # A kernel on a large offset: standardizing its bfloat16 copy would keep about 2 bits of each weight.
    rng = np.random.default_rng(1)
    kernel = (50 + 0.01 * rng.standard_normal((3, 3, 8, 4))).astype(np.float32)
    with policy("mixed_bfloat16"):
        conv = StandardizedConv2D(4, 3, use_bias=False)
        conv.build((None, 6, 6, 8))
    conv.set_weights([kernel])
    assert conv.kernel.dtype == tf.float32
    x = np.round(rng.standard_normal((1, 6, 6, 8)) * 4) / 4  # exact in bfloat16
    got = conv.convolution_op(tf.constant(x, tf.bfloat16), conv.kernel)
    expected = tf.nn.conv2d(tf.constant(x, tf.float32), standardize_kernel(kernel), 1, "VALID")
    assert got.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), expected.numpy(), rtol=0.02, atol=0.2)


def test_bfloat16_needs_a_model_bitray_builds_and_a_processor_that_has_it(tmp_path) -> None:
    assert builds_model("random:tiny") and builds_model("npz:s3://b/BiT-S-R50x1.npz")
    assert not builds_model("bit-s-r101x1") and not builds_model("savedmodel:/models/x")
    check_cpu_precision("float32", "bit-s-r101x1")  # float32 runs anything
    with pytest.raises(BitrayError, match=r"cpu_precision bfloat16 needs a model bitray builds.*'hub:x'"):
        check_cpu_precision("bfloat16", "hub:x")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    with pytest.raises(BitrayError, match=r"avx512_bf16 or amx_bf16.*cpu_precision: float32"):
        require_cpu_bfloat16(cpu_flags(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    require_cpu_bfloat16(cpu_flags(info))
    assert cpu_flags(tmp_path / "missing") == set()
