"""The BiT architecture: the official key layout and shapes, parameter counts, GN and WS numerics."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from bitray.errors import BitrayError
from bitray.model.bit import (
    VARIANTS,
    GroupNorm,
    StandardizedConv2D,
    build_bit,
    fold_weight_standardization,
    get_variant,
    is_folded,
    named_weights,
)

# timm's published sizes of the 1000-class BiT models (resnetv2_*_bit), in millions, rounded to 0.01M
TIMM_MPARAMS = {"r50x1": 25.55, "r50x3": 217.32, "r101x1": 44.54, "r101x3": 387.93, "r152x2": 236.34,
                "r152x4": 936.53}  # fmt: skip


def official_shapes(units: tuple[int, ...], width: float, num_classes: int | None) -> dict[str, tuple]:
    """The key -> shape layout of an official BiT checkpoint, written out from the paper's description."""
    root = int(64 * width)
    shapes = {"resnet/root_block/standardized_conv2d/kernel": (7, 7, 3, root)}
    channels = root
    for block, count in enumerate(units, start=1):
        mid = root * 2 ** (block - 1)
        for unit in range(1, count + 1):
            prefix = f"resnet/block{block}/unit{unit:02d}"
            shapes[f"{prefix}/a/group_norm/gamma"] = shapes[f"{prefix}/a/group_norm/beta"] = (channels,)
            shapes[f"{prefix}/a/standardized_conv2d/kernel"] = (1, 1, channels, mid)
            shapes[f"{prefix}/b/group_norm/gamma"] = shapes[f"{prefix}/b/group_norm/beta"] = (mid,)
            shapes[f"{prefix}/b/standardized_conv2d/kernel"] = (3, 3, mid, mid)
            shapes[f"{prefix}/c/group_norm/gamma"] = shapes[f"{prefix}/c/group_norm/beta"] = (mid,)
            shapes[f"{prefix}/c/standardized_conv2d/kernel"] = (1, 1, mid, 4 * mid)
            if unit == 1:
                shapes[f"{prefix}/a/proj/standardized_conv2d/kernel"] = (1, 1, channels, 4 * mid)
            channels = 4 * mid
    shapes["resnet/group_norm/gamma"] = shapes["resnet/group_norm/beta"] = (channels,)
    if num_classes:
        shapes["resnet/head/conv2d/kernel"] = (channels, num_classes)  # a 1x1 conv in the .npz
        shapes["resnet/head/conv2d/bias"] = (num_classes,)
    return shapes


@pytest.mark.parametrize("arch", [a for a in VARIANTS if a != "tiny"])
def test_every_variant_has_the_official_layout_and_size(arch: str) -> None:
    variant = VARIANTS[arch]
    with tf.Graph().as_default():  # declares the variables without allocating R152x4's 3.7 GB
        model = build_bit(arch, 1000, seed=None)
        shapes = {key: tuple(var.shape) for key, var in named_weights(model).items()}
        total = model.count_params()
        head = model.get_layer("head/conv2d").count_params()
    assert shapes == official_shapes(variant.units, variant.width, 1000)
    assert total == sum(int(np.prod(s)) for s in shapes.values())
    assert round(total / 1e6, 2) == TIMM_MPARAMS[arch]
    assert head == variant.feature_dim * 1000 + 1000
    assert variant.feature_dim == 2048 * variant.width
    if arch == "r101x1":
        assert total - head == 42_492_480
        assert total == 44_541_480


def test_tiny_is_the_same_code_at_test_size() -> None:
    model = build_bit("tiny")
    shapes = {key: tuple(var.shape) for key, var in named_weights(model).items()}
    assert shapes == official_shapes((1, 1, 1, 1), 0.5, None)
    for size in [(32, 32), (64, 48)]:
        out = model(np.random.default_rng(0).random((2, *size, 3), np.float32))
        assert out.shape == (2, 1024)
        assert np.isfinite(out.numpy()).all()


def test_head_is_zero_initialised() -> None:
    logits = build_bit("tiny", 7)(np.random.default_rng(0).random((3, 32, 32, 3), np.float32))
    assert logits.shape == (3, 7)
    assert not np.any(logits.numpy())


def test_arch_names() -> None:
    assert get_variant("R101x1") is VARIANTS["r101x1"]
    assert get_variant("bit-m-r50x3") is VARIANTS["r50x3"]
    with pytest.raises(BitrayError, match="unknown BiT architecture 'r34x1'.*r50x1"):
        get_variant("r34x1")


@pytest.mark.parametrize("relu", [False, True])
def test_group_norm_matches_numpy(relu: bool) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 5, 6, 128)) * 3 + 7).astype(np.float32)
    layer = GroupNorm(relu=relu)
    layer.build(x.shape)
    gamma, beta = rng.standard_normal(128).astype(np.float32), rng.standard_normal(128).astype(np.float32)
    layer.set_weights([gamma, beta])
    grouped = x.astype(np.float64).reshape(2, 5 * 6, 32, 4)  # 32 groups of 4 channels
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = grouped.var(axis=(1, 3), keepdims=True)  # population variance
    expected = ((grouped - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * gamma + beta
    if relu:
        expected = np.maximum(expected, 0)
        assert (expected == 0).mean() > 0.2  # the ReLU really clips
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=2e-5)


def test_fused_group_norm_relu_gives_the_same_features_and_gradients() -> None:
    fused, unfused = build_bit("tiny"), build_bit("tiny", fuse_gn_relu=False)
    assert [w.name for w in fused.weights] == [w.name for w in unfused.weights]
    assert "block1/unit01/a/relu" in [layer.name for layer in unfused.layers]
    images = np.random.default_rng(5).random((2, 40, 40, 3), np.float32)
    np.testing.assert_allclose(fused(images).numpy(), unfused(images).numpy(), atol=1e-4)

    def gradients(model: tf_keras.Model) -> list[np.ndarray]:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(images, training=True)))
        return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]

    for got, expected in zip(gradients(fused), gradients(unfused), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_group_norm_uses_epsilon_1e_5() -> None:
    x = np.zeros((1, 2, 2, 32), np.float32)
    x[..., 0] = [[0.0, 0.01], [0.0, 0.01]]  # variance 2.5e-5 in group 0: epsilon 1e-5 vs 1e-3 differ
    out = GroupNorm()(x).numpy()[..., 0]
    assert out[0, 0, 1] == pytest.approx(0.005 / np.sqrt(2.5e-5 + 1e-5), rel=1e-4)


def test_weight_standardization_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    kernel = (rng.standard_normal((1, 1, 8, 16)) * 0.3 + 0.2).astype(np.float32)
    conv = StandardizedConv2D(16, 1, use_bias=False)
    conv.build(x.shape)
    conv.set_weights([kernel])
    k = kernel.astype(np.float64)
    mean = k.mean(axis=(0, 1, 2), keepdims=True)
    std_k = (k - mean) / np.sqrt(k.var(axis=(0, 1, 2), keepdims=True) + 1e-10)
    expected = np.einsum("bhwi,io->bhwo", x, std_k[0, 0])
    np.testing.assert_allclose(conv(x).numpy(), expected, atol=1e-4)
    plain = np.einsum("bhwi,io->bhwo", x, kernel[0, 0])
    assert np.abs(conv(x).numpy() - plain).max() > 0.1  # the kernel really is standardized


def test_weight_standardization_3x3_strided() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 6, 6, 4)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 4, 8)).astype(np.float32) + 1.0
    conv = StandardizedConv2D(8, 3, strides=2, use_bias=False)
    conv.build(x.shape)
    conv.set_weights([kernel])
    k = kernel.astype(np.float64)
    std_k = (k - k.mean((0, 1, 2))) / np.sqrt(k.var((0, 1, 2)) + 1e-10)
    expected = np.zeros((1, 2, 2, 8))
    for i in range(2):
        for j in range(2):
            patch = x[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]
            expected[0, i, j] = np.einsum("hwi,hwio->o", patch, std_k)
    np.testing.assert_allclose(conv(x).numpy(), expected, atol=1e-4)


def test_folded_weight_standardization_gives_the_same_features() -> None:
    model = build_bit("tiny")
    images = np.random.default_rng(4).random((2, 40, 40, 3), np.float32)
    expected = model(images).numpy()
    assert not is_folded(model)
    assert fold_weight_standardization(model) is model
    assert is_folded(model) and not model.trainable
    np.testing.assert_allclose(model(images).numpy(), expected, atol=1e-4)
    kernel = model.get_layer("block1/unit01/b/standardized_conv2d").kernel.numpy()
    np.testing.assert_allclose(kernel.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(kernel.std(axis=(0, 1, 2)), 1, atol=1e-4)


def test_random_init_is_identical_across_processes() -> None:
    code = (
        "import bitray, hashlib; from bitray.model import load_model; "
        "m = load_model('random:tiny').model; "
        "print(hashlib.sha256(b''.join(w.tobytes() for w in m.get_weights())).hexdigest())"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in "ab"]
    digests = [proc.communicate(timeout=300)[0].strip().splitlines()[-1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert digests[0] == digests[1]
    assert len(digests[0]) == 64
