"""The model deployment: one BiT model per deployment, requests batched by Ray Serve.

Replicas receive uint8 pixels already decoded at the model's size (by the ingress) and only run the
network, scaled to [0, 1] inside the traced graph exactly as the embedding actors do
(``bitray.embed.actor``), so a served vector equals the bulk one.

Batching (``@serve.batch``): a replica runs up to ``batch_size`` requests at once and, once the first is
in, waits ``batch_wait_s`` for more. The forward pass runs in a thread, so requests keep queueing while a
batch computes: under load the next batch is already full when the previous one ends, and the wait only
matters at low load, where it is the added latency. Defaults: 16 and 5 ms. On CPU, R50x1 at 224 takes
about 60-90 ms per image on 2 cores with little gain beyond 8-16 images per call, so 16 captures the
gain while keeping a full batch's latency near one second; a 5 ms wait is under 10% of one image's
forward pass, so a lone request pays almost nothing for it. On a GPU raise ``batch_size`` (32-64).
"""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

DEFAULT_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_S = 0.005


class ModelServer:
    """A feature-vector model (``task="embed"``: features) or a classifier (``"classify"``: probabilities)."""

    def __init__(
        self,
        spec: str,
        *,
        task: str,
        threads: int,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
        storage_json: str = "",
        expect_model_id: str | None = None,
        warm_size: tuple[int, int] | None = None,
    ) -> None:
        """``expect_model_id``: the index's model; a spec that now loads other weights is refused (its
        vectors would not be comparable). ``warm_size``: trace the graph at this size before serving."""
        from bitray.embed.actor import configure_tensorflow

        configure_tensorflow(threads=threads)  # also: GPU memory grows on demand, not all at once
        import tensorflow as tf

        from bitray.config import StorageConfig
        from bitray.errors import BitrayError
        from bitray.model import load_model

        storage = StorageConfig.model_validate_json(storage_json) if storage_json else None
        loaded = load_model(spec, storage=storage, classifier=task == "classify")
        if task == "classify" and loaded.num_classes is None:
            raise BitrayError(
                f"classifier {spec!r} ({loaded.model_id}) has no classifier head; give a fine-tuned "
                "classifier's export (savedmodel:DIR/classifier or models:/NAME@ALIAS)"
            )
        if expect_model_id is not None and loaded.model_id != expect_model_id:
            raise BitrayError(
                f"model {spec!r} loads weights {loaded.model_id!r}, but the index holds vectors of "
                f"{expect_model_id!r}; serve the index's model (leave --model out)"
            )
        model = loaded.model
        signature = [tf.TensorSpec([None, None, None, 3], tf.uint8)]
        if task == "classify":
            fn = lambda images: tf.nn.softmax(model(tf.cast(images, tf.float32) * (1 / 255), training=False))  # noqa: E731
        else:
            fn = lambda images: model(tf.cast(images, tf.float32) * (1 / 255), training=False)  # noqa: E731
        self.forward = tf.function(fn, input_signature=signature)
        names = loaded.class_names or (
            [str(i) for i in range(loaded.num_classes)] if loaded.num_classes else None
        )
        self.described = {
            "model": loaded.model_id,
            "task": task,
            "dim": loaded.feature_dim if task == "embed" else loaded.num_classes,
            "labels": names if task == "classify" else None,
            "image_size": loaded.image_size,
        }
        self.run.set_max_batch_size(batch_size)
        self.run.set_batch_wait_timeout_s(batch_wait_s)
        if warm_size is not None:
            self.forward(np.zeros((1, *warm_size, 3), np.uint8))

    def describe(self) -> dict:
        """Model id, task, output size, class names, and the side it was fine-tuned at (if known)."""
        return self.described

    @serve.batch(max_batch_size=DEFAULT_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def run(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 ``[h, w, 3]`` per request -> its float32 output row."""
        batch = np.stack(pixels)
        outputs = await asyncio.to_thread(lambda: np.asarray(self.forward(batch), np.float32))
        return list(outputs)
