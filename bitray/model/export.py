"""Export a loaded BiT model as a TF-Hub-style (Reusable) SavedModel.

The SavedModel behaves like ``https://tfhub.dev/google/bit/s-r101x1/1``: ``hub.KerasLayer(dir)(images)``
maps float32 images ``[b, h, w, 3]`` in [0, 1] to ``[b, D]`` features (or logits with ``classifier=True``),
and ``hub.KerasLayer(dir, trainable=True)`` fine-tunes it. That needs the Reusable SavedModel interface:
``obj.__call__(images, training=...)``, ``obj.variables``, ``obj.trainable_variables`` and
``obj.regularization_losses``. Weight Standardization stays inside the function (it is not folded into
the kernels), so gradients flow through it exactly as during BiT's own training.

A ``serving_default`` signature serves TF Serving, and ``assets.extra/bitray.json`` records the model id,
variant and output size for ``savedmodel:DIR``.

Portable: the functions are traced under ``bit.portable_ops()``, so the SavedModel holds no must-compile
XLA function (the in-process model keeps its fused Group Norm + ReLU); it converts with
``tf.lite.TFLiteConverter.from_saved_model``. A model that knows its classes (``loaded.class_names``)
carries them three ways: the asset ``assets/labels.txt`` (one name a line, in logit order), the
``class_names()`` function of the loaded object, and the ``class_names`` signature; the classifier's
``serving_default`` returns ``logits`` and ``probabilities``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import tensorflow as tf

from bitray import __version__
from bitray import storage as st
from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.model.bit import portable_ops
from bitray.model.weights import (
    LABELS_FILE,
    METADATA_FILE,
    LoadedModel,
    features_model,
    require_raw_weights,
)

IMAGES = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")


def _module(net, output: str, labels: Path | None) -> tf.train.Checkpoint:  # noqa: ANN001 - tf_keras.Model
    """The object ``tf.saved_model.save`` writes: the network's variables and its traced functions."""

    # `training` is a tensor, so one trace serves both values; hub.KerasLayer passes it by keyword
    @tf.function(input_signature=[IMAGES, tf.TensorSpec([], tf.bool, name="training")])
    def call(images: tf.Tensor, training: bool | tf.Tensor = False) -> tf.Tensor:
        return net(images, training=training)

    @tf.function(input_signature=[IMAGES])
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        values = net(images, training=False)
        if output == "logits":
            return {"logits": values, "probabilities": tf.nn.softmax(values, axis=-1)}
        return {output: values}

    module = tf.train.Checkpoint()
    # only the variables and the traced functions are saved, not the Keras objects: Keras would trace
    # every layer's call again and write its own metadata, which hub.KerasLayer never reads
    module.variables = list(net.variables)
    # every BiT weight is trainable, whether or not this copy was loaded for training
    module.trainable_variables = [v for v in net.variables if v.trainable]
    module.regularization_losses = []
    module.__call__ = call
    module.serve = serve
    with portable_ops():  # trace now, with plain ops: saving reuses these traces
        call.get_concrete_function()
        serve.get_concrete_function()
    if labels is not None:
        names = labels.read_text(encoding="utf-8").splitlines()
        module.labels_file = tf.saved_model.Asset(str(labels))

        @tf.function(input_signature=[])
        def class_names() -> dict[str, tf.Tensor]:
            return {"class_names": tf.constant(names, tf.string)}

        module.class_names = class_names
    return module


def export_savedmodel(
    loaded: LoadedModel,
    output_dir: str | Path,
    *,
    classifier: bool = False,
    storage: StorageConfig | None = None,
) -> Path | str:
    """Write ``loaded`` as a hub-style SavedModel at ``output_dir`` (local, or s3:// / gs://); return it.

    The output must not exist yet: an export never overwrites another model. Locally the SavedModel is
    written under a temporary name and renamed when complete.
    """
    if classifier and loaded.num_classes is None:
        raise BitrayError("a classifier export needs a model with a head: pass --num-classes N")
    require_raw_weights(loaded.model)
    net = loaded.model if classifier else features_model(loaded)
    target = str(output_dir)
    if st.exists(target, storage):
        raise BitrayError(f"{target!r} already exists; choose a new --output or remove it first")
    output = "logits" if classifier else "features"
    names = loaded.class_names
    if classifier and names is not None and len(names) != loaded.num_classes:
        raise BitrayError(f"{len(names)} class names given for a {loaded.num_classes}-class head")
    if names is not None and any("\n" in name or not name for name in names):
        raise BitrayError("class names must be non-empty and on one line each (they go to labels.txt)")
    metadata = {
        "model_id": loaded.model_id,
        "arch": loaded.arch,
        "feature_dim": loaded.feature_dim,
        "num_classes": loaded.num_classes if classifier else None,
        "class_names": LABELS_FILE if names is not None else None,
        "image_size": loaded.image_size,
        "output": output,
        "input": "float32 images [batch, height, width, 3] with values in [0, 1]",
        "bitray_version": __version__,
    }
    with tempfile.TemporaryDirectory(prefix=".bitray-export-") as tmp:
        staging = Path(tmp) / "model"
        labels = None
        if names is not None:
            labels = Path(tmp) / "labels.txt"
            labels.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
        module = _module(net, output, labels)
        signatures = {"serving_default": module.serve}
        if labels is not None:
            signatures["class_names"] = module.class_names
        with portable_ops():
            tf.saved_model.save(module, str(staging), signatures=signatures)
        (staging / METADATA_FILE).parent.mkdir(parents=True, exist_ok=True)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if st.is_remote(target):
            fs, path = st.filesystem_for(target, storage)
            try:
                pafs.copy_files(str(staging), path, destination_filesystem=fs)
            except OSError as exc:
                raise BitrayError(f"cannot write the SavedModel to {target!r}: {exc}") from None
            return target
        final = st.local_path(target)
        final.parent.mkdir(parents=True, exist_ok=True)
        local_staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        shutil.move(str(staging), local_staging / "model")
        (local_staging / "model").rename(final)
        local_staging.rmdir()
        return final
