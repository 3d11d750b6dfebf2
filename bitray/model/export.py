"""Export a loaded BiT model as a TF-Hub-style (Reusable) SavedModel.

The SavedModel behaves like ``https://tfhub.dev/google/bit/s-r101x1/1``: ``hub.KerasLayer(dir)(images)``
maps float32 images ``[b, h, w, 3]`` in [0, 1] to ``[b, D]`` features (or logits with ``classifier=True``),
and ``hub.KerasLayer(dir, trainable=True)`` fine-tunes it. That needs the Reusable SavedModel interface:
``obj.__call__(images, training=...)``, ``obj.variables``, ``obj.trainable_variables`` and
``obj.regularization_losses``. Weight Standardization stays inside the function (it is not folded into
the kernels), so gradients flow through it exactly as during BiT's own training.

A ``serving_default`` signature serves TF Serving, and ``assets.extra/bitray.json`` records the model id,
variant and output size for ``savedmodel:DIR``.
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
from bitray.model.weights import METADATA_FILE, LoadedModel, features_model, require_raw_weights

IMAGES = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")


def _module(net, output: str) -> tf.train.Checkpoint:  # noqa: ANN001 - net is a tf_keras.Model
    """The object ``tf.saved_model.save`` writes: the network's variables and its traced functions."""

    # `training` is a tensor, so one trace serves both values; hub.KerasLayer passes it by keyword
    @tf.function(input_signature=[IMAGES, tf.TensorSpec([], tf.bool, name="training")])
    def call(images: tf.Tensor, training: bool | tf.Tensor = False) -> tf.Tensor:
        return net(images, training=training)

    @tf.function(input_signature=[IMAGES])
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {output: net(images, training=False)}

    module = tf.train.Checkpoint()
    # only the variables and the traced functions are saved, not the Keras objects: Keras would trace
    # every layer's call again and write its own metadata, which hub.KerasLayer never reads
    module.variables = list(net.variables)
    # every BiT weight is trainable, whether or not this copy was loaded for training
    module.trainable_variables = [v for v in net.variables if v.trainable]
    module.regularization_losses = []
    module.__call__ = call
    module.serve = serve
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
    module = _module(net, output)
    metadata = {
        "model_id": loaded.model_id,
        "arch": loaded.arch,
        "feature_dim": loaded.feature_dim,
        "num_classes": loaded.num_classes if classifier else None,
        "output": output,
        "input": "float32 images [batch, height, width, 3] with values in [0, 1]",
        "bitray_version": __version__,
    }
    with tempfile.TemporaryDirectory(prefix=".bitray-export-") as tmp:
        staging = Path(tmp) / "model"
        tf.saved_model.save(module, str(staging), signatures={"serving_default": module.serve})
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
