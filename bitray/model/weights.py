"""Load a BiT model from a spec string: TF-Hub handle, official ``.npz``, SavedModel dir, or random init.

Specs::

    bit-s-r101x1            TF-Hub handle https://tfhub.dev/google/bit/s-r101x1/1 (also bit-m-...)
    hub:<url or dir>        any TF-Hub image feature-vector module
    npz:<path|s3://|gs://>  an official BiT-{S,M}-R*x*.npz checkpoint (the variant is read from the file)
    savedmodel:<dir|s3://|gs://>  a SavedModel written by ``bitray model export`` (or any hub-style one)
    models:/<name>@<alias>  a fine-tuned model registered in MLflow (see ``bitray.model.registry``)
    random:<arch>           deterministic random init (tests, offline demos): r50x1 ... r152x4, tiny

Every model carries a ``model_id`` saying which weights it holds, e.g. ``bit-s-r101x1@tfhub``,
``bit-m-r50x1@npz:BiT-M-R50x1.npz`` or ``bit-tiny@random-init``.
"""

from __future__ import annotations

import io
import json
import logging
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from bitray import storage as st
from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.model.bit import (
    DEFAULT_SEED,
    VARIANTS,
    Variant,
    build_bit,
    get_variant,
    is_folded,
    named_weights,
)

log = logging.getLogger(__name__)

HUB_URL = "https://tfhub.dev/google/bit/{name}/1"
HEAD_KERNEL = "resnet/head/conv2d/kernel"
HEAD_BIAS = "resnet/head/conv2d/bias"
METADATA_FILE = "assets.extra/bitray.json"
LABELS_FILE = "assets/labels.txt"
SPEC_HELP = (
    "use bit-s-r101x1 (TF-Hub), hub:URL, npz:PATH, savedmodel:DIR, models:/NAME@ALIAS (MLflow) "
    "or random:ARCH (e.g. random:tiny)"
)


@dataclass
class LoadedModel:
    """A ready model: float32 images ``[b, h, w, 3]`` in [0, 1] -> features ``[b, feature_dim]`` or logits."""

    model: tf_keras.Model
    model_id: str
    arch: str | None
    feature_dim: int
    num_classes: int | None = None
    class_names: list[str] | None = None
    """The class of each logit, in order, for a model that knows them (a fine-tuned export's labels)."""
    image_size: int | None = None
    """The side images were fed at in training's evaluation (a fine-tune's crop), when known."""

    def inference_function(self) -> Callable[[Any], Any]:
        """The model as one traced TF graph for inference (``training=False``), any batch and image size.

        Calling a deep Keras model eagerly runs it op by op from Python; a traced graph lets TensorFlow
        schedule the whole forward pass, which on CPU is markedly faster for R101x1.
        """
        model = self.model
        spec = tf.TensorSpec([None, None, None, 3], tf.float32)
        return tf.function(lambda images: model(images, training=False), input_signature=[spec])


def normalize_spec(spec: str) -> str:
    """Accept a bare ``.npz`` path or SavedModel dir as shorthand for ``npz:`` / ``savedmodel:``."""
    spec = spec.strip()
    if re.match(r"^(hub|npz|savedmodel|random|models):", spec) or re.fullmatch(
        r"bit-[sm]-r\d+x\d+", spec.lower()
    ):
        return spec
    if spec.lower().endswith(".npz"):
        return f"npz:{spec}"
    if not st.is_remote(spec) and (st.local_path(spec) / "saved_model.pb").exists():
        return f"savedmodel:{spec}"
    raise BitrayError(f"unknown model spec {spec!r}; {SPEC_HELP}")


def load_model(
    spec: str,
    *,
    num_classes: int | None = None,
    trainable: bool = False,
    storage: StorageConfig | None = None,
    arch: str | None = None,
    classifier: bool = False,
) -> LoadedModel:
    """Build the model a spec names.

    ``num_classes`` adds a logits head (loaded from the checkpoint when its class count matches, else
    zero-initialised with a warning). ``classifier=True`` asks for a fine-tuned classifier export as it
    is (``savedmodel:`` of a classifier dir, or ``models:/NAME@ALIAS``'s classifier part): its head and
    ``class_names`` come from the SavedModel. ``arch`` checks an ``npz:`` file's variant. For inference only,
    ``bitray.model.bit.fold_weight_standardization(loaded.model)`` standardizes the kernels once.
    """
    if num_classes is not None and num_classes < 1:
        raise BitrayError(f"num_classes must be a positive number of classes, not {num_classes}")
    spec = normalize_spec(spec)
    kind, _, rest = spec.partition(":")
    if kind == "random":
        loaded = _random(rest, num_classes)
    elif kind == "npz":
        loaded = _from_npz(rest, num_classes, arch, storage)
    elif kind == "savedmodel":
        loaded = _from_savedmodel(rest, num_classes, trainable, storage, classifier)
    elif kind == "models":  # an MLflow registered model: models:/<name>@<alias> or models:/<name>/<version>
        from bitray.model.registry import CLASSIFIER, FEATURE_VECTOR, resolve_registered_model

        part = CLASSIFIER if classifier or num_classes is not None else FEATURE_VECTOR
        local = str(resolve_registered_model(spec, part))
        loaded = _from_savedmodel(local, num_classes, trainable, storage, classifier)
    elif kind == "hub":
        loaded = _from_hub(rest, num_classes, trainable)
    else:  # bit-s-r101x1
        loaded = _from_hub(HUB_URL.format(name=spec.lower()[len("bit-") :]), num_classes, trainable)
    if arch is not None and loaded.arch is not None and get_variant(arch).name != loaded.arch:
        raise BitrayError(f"{spec!r} holds a BiT {loaded.arch} model, not {arch}; pass --arch {loaded.arch}")
    loaded.model.trainable = trainable
    return loaded


# --- random init -------------------------------------------------------------------------------------


def _random(arch: str, num_classes: int | None) -> LoadedModel:
    variant = get_variant(arch)
    model = build_bit(variant, num_classes, seed=DEFAULT_SEED)
    model_id = f"bit-{variant.name}@random-init"
    return LoadedModel(model, model_id, variant.name, variant.feature_dim, num_classes)


# --- official .npz checkpoints -----------------------------------------------------------------------


def _read_npz(uri: str, storage: StorageConfig | None) -> dict[str, np.ndarray]:
    path = st.copy_to_local(uri, storage)
    if path.is_dir():
        raise BitrayError(f"npz:{uri} is a directory, not a .npz file; for a SavedModel use savedmodel:")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        raise BitrayError(
            f"npz:{uri} is not a BiT checkpoint (cannot read it as .npz: {exc}); "
            "download an official BiT-{S,M}-R*x*.npz file"
        ) from None
    if not any(key.startswith("resnet/") for key in arrays):
        raise BitrayError(
            f"npz:{uri} is not a BiT checkpoint: it has no 'resnet/...' keys "
            f"(found e.g. {sorted(arrays)[:3]}); download an official BiT-{{S,M}}-R*x*.npz file"
        )
    return arrays


def infer_variant(arrays: dict[str, np.ndarray]) -> Variant | None:
    """The variant whose units and width match a checkpoint's keys and root kernel, if any."""
    units = tuple(
        len({k.split("/")[2] for k in arrays if k.startswith(f"resnet/block{b}/unit")}) for b in range(1, 5)
    )
    root = arrays.get("resnet/root_block/standardized_conv2d/kernel")
    if root is None or root.ndim != 4:
        return None
    width = root.shape[-1] / 64
    return next((v for v in VARIANTS.values() if v.units == units and v.width == width), None)


def _checkpoint_name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _from_npz(uri: str, num_classes: int | None, arch: str | None, storage: StorageConfig | None):
    arrays = _read_npz(uri, storage)
    found = infer_variant(arrays)
    variant = get_variant(arch) if arch else found
    if variant is None:
        raise BitrayError(
            f"npz:{uri} does not match any BiT variant ({', '.join(VARIANTS)}); "
            "pass --arch to name the variant it was trained as"
        )
    if found is not None and found != variant:
        with tf.Graph().as_default():  # the shapes only: never allocate a model the file cannot fill
            _check_fits(uri, arrays, named_weights(build_bit(variant, seed=None)), variant, found)
    model = build_bit(variant, num_classes, seed=None)
    backbone = {k: v for k, v in named_weights(model).items() if not k.startswith("resnet/head/")}
    _check_fits(uri, arrays, backbone, variant, found)
    for key, var in backbone.items():
        var.assign(arrays[key])
    if num_classes is not None:
        _load_head(model, arrays, num_classes, f"npz:{uri}")
    name = _checkpoint_name(uri)
    match = re.search(r"bit-([sm])-r\d+x\d+", name.lower())
    prefix = f"bit-{match.group(1)}-{variant.name}" if match else f"bit-{variant.name}"
    return LoadedModel(model, f"{prefix}@npz:{name}", variant.name, variant.feature_dim, num_classes)


def _check_fits(uri: str, arrays: dict, weights: dict, variant: Variant, found: Variant | None) -> None:
    """Raise a ``BitrayError`` naming the first key whose shape differs, or the keys that are missing."""
    for key, var in weights.items():
        if key in arrays and tuple(arrays[key].shape) != tuple(var.shape):
            raise BitrayError(
                f"npz:{uri} does not fit BiT {variant.name}: key {key} has shape {tuple(arrays[key].shape)}, "
                f"{variant.name} needs {tuple(var.shape)}; {_variant_hint(found, variant)}"
            )
    missing = [key for key in weights if key not in arrays]
    if missing:
        raise BitrayError(
            f"npz:{uri} lacks {len(missing)} of the {len(weights)} keys BiT {variant.name} needs "
            f"(first: {missing[0]}); {_variant_hint(found, variant)}"
        )


def _variant_hint(found: Variant | None, asked: Variant) -> str:
    if found is not None and found != asked:
        return f"this file holds a BiT {found.name}: use --arch {found.name} (or leave --arch out)"
    return "the file is damaged or was not written for this variant; download it again"


def _load_head(model: tf_keras.Model, arrays: dict[str, np.ndarray], num_classes: int, source: str) -> None:
    kernel = arrays.get(HEAD_KERNEL)
    if kernel is not None and kernel.shape[-1] == num_classes and HEAD_BIAS in arrays:
        head = model.get_layer("head/conv2d")
        head.set_weights([kernel.reshape(kernel.shape[-2], num_classes), arrays[HEAD_BIAS]])
        return
    have = f"a {kernel.shape[-1]}-class head" if kernel is not None else "no head"
    log.warning("%s has %s; the %d-class head starts at zero", source, have, num_classes)


def save_npz(model: tf_keras.Model, uri: str, storage: StorageConfig | None = None) -> None:
    """Write a bitray-built BiT model's weights in the official ``.npz`` key layout (local or s3://)."""
    require_raw_weights(model)
    arrays = {}
    for key, var in named_weights(model).items():
        value = var.numpy()
        if key == HEAD_KERNEL:
            value = value.reshape(1, 1, *value.shape)  # the official head is a 1x1 convolution
        arrays[key] = value
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    st.write_bytes(uri, buffer.getvalue(), storage)


# --- SavedModels and TF-Hub ----------------------------------------------------------------------------


def _hub_model(
    module_dir: str, num_classes: int | None, trainable: bool, classes_in_module: int | None
) -> tuple[tf_keras.Model, int]:
    """Wrap a hub-style SavedModel in a Keras model; add a zero-initialised head when classes are asked."""
    import tensorflow_hub as hub

    images = tf_keras.Input(shape=(None, None, 3), dtype="float32", name="images")
    outputs = hub.KerasLayer(
        module_dir, trainable=trainable, name="pre_logits" if classes_in_module is None else "logits"
    )(images)
    width = int(outputs.shape[-1])
    if classes_in_module is not None:
        if num_classes != classes_in_module:
            raise BitrayError(
                f"{module_dir} is a classifier with {classes_in_module} classes and gives no features; "
                f"load it with num_classes={classes_in_module} or export the model without --classifier"
            )
        return tf_keras.Model(images, outputs), width
    if num_classes is not None:
        log.warning("%s has no head; the %d-class head starts at zero", module_dir, num_classes)
        outputs = tf_keras.layers.Dense(
            num_classes, kernel_initializer="zeros", bias_initializer="zeros", name="head/conv2d"
        )(outputs)
    return tf_keras.Model(images, outputs), width


def read_metadata(module_dir: Path) -> dict:
    meta = module_dir / METADATA_FILE
    return json.loads(meta.read_text()) if meta.is_file() else {}


def read_class_names(module_dir: Path) -> list[str] | None:
    """The class names a SavedModel carries in ``assets/labels.txt`` (one a line, in logit order)."""
    labels = module_dir / LABELS_FILE
    return labels.read_text(encoding="utf-8").splitlines() if labels.is_file() else None


def _from_savedmodel(
    uri: str,
    num_classes: int | None,
    trainable: bool,
    storage: StorageConfig | None,
    classifier: bool = False,
) -> LoadedModel:
    path = st.copy_to_local(uri, storage)
    if not (path / "saved_model.pb").is_file():
        raise BitrayError(
            f"savedmodel:{uri} is not a SavedModel directory (no saved_model.pb); "
            "write one with 'bitray model export' or use npz: for a .npz checkpoint"
        )
    meta = read_metadata(path)
    in_module = meta.get("num_classes")
    if classifier:
        if in_module is None:
            raise BitrayError(f"savedmodel:{uri} is not a classifier export (it gives features, no logits)")
        num_classes = num_classes or in_module
    model, width = _hub_model(str(path), num_classes, trainable, in_module)
    model_id = meta.get("model_id") or f"savedmodel:{_checkpoint_name(uri)}"
    feature_dim = meta.get("feature_dim", width)
    names = read_class_names(path)
    return LoadedModel(
        model, model_id, meta.get("arch"), feature_dim, num_classes, names, meta.get("image_size")
    )


def _from_hub(handle: str, num_classes: int | None, trainable: bool) -> LoadedModel:
    import tensorflow_hub as hub

    try:
        module_dir = hub.resolve(handle)
    except Exception as exc:  # noqa: BLE001 - urllib, gfile and HTTP errors all mean "not reachable"
        raise BitrayError(
            f"cannot fetch TF-Hub module {handle!r} ({type(exc).__name__}: {str(exc)[:200]}); "
            "without network, use npz:BiT-S-R101x1.npz or savedmodel:DIR, "
            "or point TFHUB_CACHE_DIR at a cache that holds it"
        ) from None
    match = re.search(r"bit/([sm])-(r\d+x\d+)", handle.lower())
    arch = match.group(2) if match and match.group(2) in VARIANTS else None
    model_id = f"bit-{match.group(1)}-{match.group(2)}@tfhub" if match else f"hub:{handle}"
    model, width = _hub_model(module_dir, num_classes, trainable, None)
    return LoadedModel(model, model_id, arch, width, num_classes)


def require_raw_weights(model: tf_keras.Model) -> None:
    """Refuse models whose kernels were standardized for inference: their raw weights are gone."""
    if is_folded(model):
        raise BitrayError(
            f"{model.name} has its weight standardization folded into the kernels (inference only); "
            "export, save or train a model loaded without fold_weight_standardization"
        )


def features_model(loaded: LoadedModel) -> tf_keras.Model:
    """The feature extractor inside ``loaded`` (the model itself when it has no head)."""
    if loaded.num_classes is None:
        return loaded.model
    try:
        pre_logits = loaded.model.get_layer("pre_logits")
    except ValueError:
        raise BitrayError(f"{loaded.model_id} is a classifier export and gives no features") from None
    return tf_keras.Model(loaded.model.inputs, pre_logits.output, name=f"{loaded.model.name}_features")


__all__ = ["LoadedModel", "load_model", "save_npz", "features_model", "normalize_spec", "infer_variant"]
