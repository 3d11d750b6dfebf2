"""The model stage: an actor that loads BiT once and turns decoded uint8 pixels into embedding rows.

An actor keeps nothing between calls: each call maps one block of decoded rows to one block of output
rows (embedding, or the error carried from the CPU stage, or ``embed`` when the model gave non-finite
features). Writing files is the next stage's job, so the model never waits on storage.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pyarrow as pa

from bitray.config import StorageConfig

log = logging.getLogger(__name__)

PASSED_THROUGH = ("row", "path", "etag", "size", "mtime_ns", "width", "height")


class EmbedActor:
    def __init__(
        self, *, model_spec: str, storage: StorageConfig, threads: int, mixed_precision: bool
    ) -> None:
        configure_tensorflow(threads=threads, mixed_precision=mixed_precision)
        import tensorflow as tf

        from bitray.model import load_model

        self.loaded = load_model(model_spec, storage=storage)
        model = self.loaded.model
        spec = tf.TensorSpec([None, None, None, 3], tf.uint8)
        # uint8 in, scaled inside the traced graph: no float32 copy of the pixels on the Python side
        self.forward = tf.function(
            lambda images: model(tf.cast(images, tf.float32) * (1 / 255), training=False),
            input_signature=[spec],
        )
        self.dim = self.loaded.feature_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        stage = np.asarray(batch["stage"], dtype=object)
        error = np.asarray(batch["error"], dtype=object)
        ok = np.array([s is None for s in stage], bool)
        features = np.zeros((len(ok), self.dim), np.float32)
        if ok.any():
            features[ok] = np.asarray(self.forward(batch["pixels"][ok]), np.float32)
        bad = ok & ~np.isfinite(features).all(axis=1)
        stage[bad], error[bad] = "embed", "ValueError: the model gave non-finite features"
        ok &= ~bad
        flat = pa.array(features.reshape(-1), pa.float32())
        embedding = pa.FixedSizeListArray.from_arrays(flat, self.dim, mask=pa.array(~ok))
        columns = {name: batch[name] for name in PASSED_THROUGH}
        return pa.table(
            {
                **columns,
                "embedding": embedding,
                "model": pa.array([self.loaded.model_id] * len(ok), pa.string()),
                "stage": pa.array(list(stage), pa.string()),
                "error": pa.array(list(error), pa.string()),
            }
        )


def configure_tensorflow(*, threads: int, mixed_precision: bool) -> None:
    """Size TF's thread pools (not Ray's CPU reservation), grow GPU memory on demand, float16 on GPU."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TF already initialised in this worker process
        log.warning("TensorFlow was initialised before the actor could size its thread pools")
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):  # already initialised: growth was set by then or cannot be
            tf.config.experimental.set_memory_growth(gpu, True)
    if mixed_precision and gpus:
        import tf_keras

        tf_keras.mixed_precision.set_global_policy("mixed_float16")
