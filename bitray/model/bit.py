"""BiT (Big Transfer) ResNet-v2 in Keras 2: Group Norm + Weight Standardization, every published variant.

One table (``VARIANTS``) drives every model, as in timm's ``resnetv2.py``. Layer names are the official
checkpoint keys without the ``resnet/`` prefix and the variable leaf, so ``npz_key(layer, weight)`` is
``resnet/<layer name>/<leaf>`` (e.g. ``resnet/block1/unit01/a/standardized_conv2d/kernel``).

Models take float32 images ``[batch, h, w, 3]`` in [0, 1] (like the TF-Hub modules) and map them to
[-1, 1] inside, as the raw checkpoints expect.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import tensorflow as tf
import tf_keras

from bitray.errors import BitrayError

GN_GROUPS = 32
GN_EPSILON = 1e-5
WS_EPSILON = 1e-10
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Variant:
    """A BiT ResNet-v2: bottleneck units per stage and the width multiplier."""

    name: str
    units: tuple[int, int, int, int]
    width: float

    @property
    def root_filters(self) -> int:
        return int(64 * self.width)

    def stage_filters(self, stage: int) -> int:
        """Width of the bottleneck (conv a/b) in ``stage`` (0-based); units output 4x this."""
        return int(64 * self.width) * 2**stage

    @property
    def feature_dim(self) -> int:
        return 4 * self.stage_filters(3)

    def describe(self) -> str:
        width = f"x{self.width:g}"
        return f"{self.name} (units {'-'.join(map(str, self.units))}, width {width})"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("r50x1", (3, 4, 6, 3), 1),
        Variant("r50x3", (3, 4, 6, 3), 3),
        Variant("r101x1", (3, 4, 23, 3), 1),
        Variant("r101x3", (3, 4, 23, 3), 3),
        Variant("r152x2", (3, 8, 36, 3), 2),
        Variant("r152x4", (3, 8, 36, 3), 4),
        # the same code at test size: one unit per stage, half width (32 channels: one per GN group)
        Variant("tiny", (1, 1, 1, 1), 0.5),
    )
}


def get_variant(arch: str) -> Variant:
    """``R101x1``, ``r101x1``, ``bit-s-r101x1`` or ``tiny`` -> the variant; a ``BitrayError`` otherwise."""
    name = arch.strip().lower()
    name = re.sub(r"^bit-[sm]-", "", name)
    name = re.sub(r"^bit-", "", name)
    if name in VARIANTS:
        return VARIANTS[name]
    raise BitrayError(f"unknown BiT architecture {arch!r}; choose one of {', '.join(VARIANTS)}")


def standardize_kernel(kernel: tf.Tensor) -> tf.Tensor:
    """Weight Standardization: zero mean, unit (population) variance per output channel over H, W, I."""
    mean, var = tf.nn.moments(kernel, axes=[0, 1, 2], keepdims=True)
    return (kernel - mean) / tf.sqrt(var + WS_EPSILON)


class StandardizedConv2D(tf_keras.layers.Conv2D):
    """Conv2D whose kernel is weight-standardized on every call.

    Overrides the public ``convolution_op``; the released bit_tf2 code patches a private attribute that
    current Keras never calls. ``standardize=False`` gives a plain convolution, for models whose kernels
    were standardized once ahead of time (``fold_weight_standardization``).
    """

    def __init__(self, *args, standardize: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.standardize = standardize

    def add_weight(self, *args, **kwargs) -> tf.Variable:
        # The kernel reads as float32 under a mixed policy too: standardized in float32, then cast.
        return super().add_weight(*args, **{"autocast": False, **kwargs})

    def convolution_op(self, inputs: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        if self.standardize:
            kernel = standardize_kernel(kernel)
        return super().convolution_op(inputs, tf.cast(kernel, self.compute_dtype))

    def get_config(self) -> dict:
        return {**super().get_config(), "standardize": self.standardize}


_PORTABLE = threading.local()


@contextlib.contextmanager
def portable_ops() -> Iterator[None]:
    """Trace BiT with plain TensorFlow ops only: no must-compile XLA function (``_scale_shift_relu``).

    Exported SavedModels are traced inside this block, so TF Serving, TFLite and other converters see
    ordinary ``Mul``/``AddV2``/``Relu`` ops and no input shape triggers an XLA compile; in-process
    inference and training keep the fused path.
    """
    previous = getattr(_PORTABLE, "on", False)
    _PORTABLE.on = True
    try:
        yield
    finally:
        _PORTABLE.on = previous


@tf.function(jit_compile=True)
def _scale_shift_relu(inputs: tf.Tensor, scale: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
    """``relu(inputs * scale + offset)`` compiled by XLA into one pass over the activations.

    Unfused, TensorFlow runs three full-size ops (Mul, AddV2, Relu), each reading and writing the whole
    activation. Group Norm + ReLU took about a fifth of R101x1's forward time on CPU, half of it in
    these memory-bound passes (the rest is the two reductions for the statistics). ``scale`` and
    ``offset`` are float32; a bfloat16 ``inputs`` is computed on in float32 inside the one pass.
    """
    return _scale_shift(inputs, scale, offset, relu=True)


def _scale_shift(inputs: tf.Tensor, scale: tf.Tensor, offset: tf.Tensor, relu: bool) -> tf.Tensor:
    """``inputs * scale + offset`` (and ReLU) in float32, returned in the dtype of ``inputs``.

    In bfloat16, ``x * scale + offset`` cancels catastrophically when a group's mean is large next to
    its spread (x = 100.5, mean 100.25: 225 - 224.5 with 8-bit mantissas).
    """
    out = tf.cast(inputs, tf.float32) * scale + offset
    return tf.cast(tf.nn.relu(out) if relu else out, inputs.dtype)


class GroupNorm(tf_keras.layers.Layer):
    """Group Normalization over channels-last inputs (32 groups, epsilon 1e-5 as in BiT).

    Keras' ``GroupNormalization`` builds a full-size mask tensor of ones on every call and reduces over
    a ``[b, h, w, groups, c/g]`` view; this one reduces over H, W with channels last, then per group, and
    applies the moments as one per-sample, per-channel scale and offset (R101x1's forward pass ran ~1.3x
    faster than with the [b, hw, groups, c/g] reduction in one CPU measurement).

    ``relu=True`` also applies the ReLU that follows every Group Norm in BiT, fused with the scale and
    offset by XLA (``_scale_shift_relu``): R101x1's folded forward pass on a 2-core CPU went from 0.73x to
    0.80x of Keras' ResNet101V2 (bench/model_bench.py, ``--gn fused,unfused``). The statistics stay
    two-pass (a one-pass E[x^2] - E[x]^2 was barely faster and 3x further from the exact result), so
    the outputs are the unfused layer's up to float rounding, and gradients flow through XLA unchanged.

    Under a mixed policy (``mixed_bfloat16``) the statistics, gamma, beta and the normalization itself
    are float32 whatever the compute dtype (a bfloat16 mean keeps 8 bits, and a group whose mean is large
    next to its spread would lose most of them); only the output is stored in the compute dtype.
    """

    def __init__(
        self, groups: int = GN_GROUPS, epsilon: float = GN_EPSILON, relu: bool = False, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.groups = groups
        self.epsilon = epsilon
        self.relu = relu

    def build(self, input_shape: tf.TensorShape) -> None:
        channels = int(input_shape[-1])
        if channels % self.groups:
            raise ValueError(f"{self.name}: {channels} channels do not split into {self.groups} groups")
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones", autocast=False)
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros", autocast=False)
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        # Reduce over H, W first (channels stay the contiguous last axis, which TensorFlow's CPU
        # reductions handle far faster than a [b, hw, groups, c/g] layout), then over each group.
        channels = inputs.shape[-1]
        per_group = [-1, self.groups, channels // self.groups]
        per_channel = [-1, 1, 1, channels]
        exact = tf.cast(inputs, tf.float32)  # the statistics in float32 (a no-op for float32 inputs)

        def group_mean(values: tf.Tensor) -> tf.Tensor:  # [b, c] -> [b, groups, 1]
            return tf.reduce_mean(tf.reshape(values, per_group), axis=2, keepdims=True)

        mean = group_mean(tf.reduce_mean(exact, axis=[1, 2]))
        mean_c = tf.reshape(tf.repeat(mean, channels // self.groups, axis=2), per_channel)
        var = group_mean(tf.reduce_mean(tf.math.squared_difference(exact, mean_c), axis=[1, 2]))
        scale = tf.reshape(self.gamma, per_group) * tf.math.rsqrt(var + self.epsilon)  # [b, groups, c/g]
        offset = tf.reshape(self.beta, per_group) - mean * scale
        scale, offset = tf.reshape(scale, per_channel), tf.reshape(offset, per_channel)
        if self.relu and not getattr(_PORTABLE, "on", False):
            return _scale_shift_relu(inputs, scale, offset)
        return _scale_shift(inputs, scale, offset, self.relu)

    def get_config(self) -> dict:
        return {**super().get_config(), "groups": self.groups, "epsilon": self.epsilon, "relu": self.relu}


class _Layers:
    """Makes the named layers of one model, with a deterministic initializer seed per convolution."""

    def __init__(self, seed: int | None, fuse_gn_relu: bool = True) -> None:
        self.seed = seed
        self.fuse_gn_relu = fuse_gn_relu
        self.count = 0

    def conv(self, name: str, filters: int, kernel: int, stride: int = 1, padding: str = "valid"):
        self.count += 1
        init = (
            tf_keras.initializers.HeNormal(seed=self.seed + self.count)
            if self.seed is not None
            else "zeros"  # weights are about to be loaded: skip drawing random numbers
        )
        return StandardizedConv2D(
            filters,
            kernel,
            strides=stride,
            padding=padding,
            use_bias=False,
            kernel_initializer=init,
            name=f"{name}/standardized_conv2d",
        )

    def norm_relu(self, scope: str, x: tf.Tensor) -> tf.Tensor:
        """ReLU(GN(x)): one fused layer, or a Group Norm layer and a ReLU layer (same weights, same keys)."""
        prefix = f"{scope}/" if scope else ""
        if self.fuse_gn_relu:
            return GroupNorm(relu=True, name=f"{prefix}group_norm")(x)
        x = GroupNorm(name=f"{prefix}group_norm")(x)
        return tf_keras.layers.ReLU(name=f"{prefix}relu")(x)


def _unit(make: _Layers, x: tf.Tensor, name: str, filters: int, stride: int) -> tf.Tensor:
    """Pre-activation bottleneck: p = ReLU(GN(x)); shortcut = proj(p) if the shape changes, else x."""
    out_filters = 4 * filters
    preact = make.norm_relu(f"{name}/a", x)
    if stride != 1 or x.shape[-1] != out_filters:
        shortcut = make.conv(f"{name}/a/proj", out_filters, 1, stride)(preact)
    else:
        shortcut = x
    y = make.conv(f"{name}/a", filters, 1)(preact)
    y = make.norm_relu(f"{name}/b", y)
    if stride == 1:
        y = make.conv(f"{name}/b", filters, 3, padding="same")(y)  # same as pad 1 + valid at stride 1
    else:
        y = tf_keras.layers.ZeroPadding2D(1, name=f"{name}/b/pad")(y)
        y = make.conv(f"{name}/b", filters, 3, stride)(y)
    y = make.norm_relu(f"{name}/c", y)
    y = make.conv(f"{name}/c", out_filters, 1)(y)
    return tf_keras.layers.Add(name=f"{name}/add")([shortcut, y])


def build_bit(
    arch: str | Variant,
    num_classes: int | None = None,
    *,
    seed: int | None = DEFAULT_SEED,
    fuse_gn_relu: bool = True,
) -> tf_keras.Model:
    """A BiT ResNet-v2: images in [0, 1] -> ``feature_dim`` features, or logits of a zero-initialised head.

    ``seed`` makes the random initialisation reproducible across processes; ``None`` initialises every
    kernel to zero (fast, for weights that are loaded next). ``fuse_gn_relu=False`` builds each ReLU as
    its own layer instead of fusing it into the Group Norm before it (the benchmark's unfused baseline).
    """
    variant = arch if isinstance(arch, Variant) else get_variant(arch)
    make = _Layers(seed, fuse_gn_relu)
    images = tf_keras.Input(shape=(None, None, 3), dtype="float32", name="images")
    x = tf_keras.layers.Rescaling(2.0, offset=-1.0, name="to_minus_one_one")(images)
    x = tf_keras.layers.ZeroPadding2D(3, name="root_block/pad")(x)
    x = make.conv("root_block", variant.root_filters, 7, 2)(x)
    x = tf_keras.layers.ZeroPadding2D(1, name="root_block/pool_pad")(x)
    x = tf_keras.layers.MaxPool2D(3, 2, padding="valid", name="root_block/pool")(x)
    for stage, units in enumerate(variant.units):
        for unit in range(units):
            stride = 2 if stage > 0 and unit == 0 else 1
            x = _unit(make, x, f"block{stage + 1}/unit{unit + 1:02d}", variant.stage_filters(stage), stride)
    x = make.norm_relu("", x)
    # Pooling and head in float32 under any policy: float32 features and logits (Keras' advice for the
    # last layers of a mixed-precision model), and the 2048-d average is summed in float32.
    outputs = tf_keras.layers.GlobalAveragePooling2D(name="pre_logits", dtype="float32")(x)
    if num_classes is not None:
        outputs = tf_keras.layers.Dense(
            num_classes,
            kernel_initializer="zeros",
            bias_initializer="zeros",
            name="head/conv2d",
            dtype="float32",
        )(outputs)
    suffix = "" if num_classes is None else f"_{num_classes}"
    return tf_keras.Model(images, outputs, name=f"bit_{variant.name}{suffix}")


def npz_key(layer: tf_keras.layers.Layer, weight: tf.Variable) -> str:
    """The official checkpoint key of one weight, e.g. ``resnet/block1/unit01/a/group_norm/gamma``."""
    leaf = weight.name.split("/")[-1].split(":")[0]
    return f"resnet/{layer.name}/{leaf}"


def named_weights(model: tf_keras.Model) -> dict[str, tf.Variable]:
    """Every weight of a BiT model by its official checkpoint key."""
    return {npz_key(layer, w): w for layer in model.layers for w in layer.weights}


def fold_weight_standardization(model: tf_keras.Model) -> tf_keras.Model:
    """Standardize every kernel of ``model`` once, in place, and stop standardizing on each call.

    Weight Standardization is a pure function of the weights, so the outputs stay the same and each
    call skips the standardization (``bench/model_bench.py`` shows what it gives). The model
    is then inference-only: training it would skip the standardization in the gradients, and its
    kernels no longer hold the checkpoint's raw values. Returns ``model`` for chaining.
    """
    for layer in model.layers:
        if isinstance(layer, StandardizedConv2D) and layer.standardize:
            layer.kernel.assign(standardize_kernel(layer.kernel))
            layer.standardize = False
    model.trainable = False
    return model


def is_folded(model: tf_keras.Model) -> bool:
    """Whether ``fold_weight_standardization`` has turned ``model`` into an inference-only copy."""
    return any(isinstance(layer, StandardizedConv2D) and not layer.standardize for layer in model.layers)


def count_params(arch: str, num_classes: int | None = None) -> int:
    """Parameters of a variant, counted on the real Keras model built in a throwaway graph.

    Inside a graph the variables are declared but never allocated, so even R152x4 (936M) counts in
    about a second.
    """
    with tf.Graph().as_default():
        return int(build_bit(arch, num_classes, seed=None).count_params())
