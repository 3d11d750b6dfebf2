"""The model deployment: one BiT model per deployment, requests batched by Ray Serve.

Replicas receive uint8 pixels already decoded at the model's size (by the ingress) and only run the
network, scaled to [0, 1] inside the traced graph exactly as the embedding actors do
(``bitray.embed.actor``), so a served vector equals the bulk one.

Batching (``@serve.batch``): a replica runs up to ``batch_size`` requests at once. Serve forms the next
batch as soon as requests arrive, not when the replica is free: with a fixed short wait, requests that
arrive while a batch computes become many batches of one or two that then run one after another (measured:
a mean batch of 1.1 at 8 concurrent requests). So the wait follows the replica's state: idle, a first
request waits ``batch_wait_s`` (5 ms, small next to one forward pass: tens to hundreds of ms on CPU) for
company; while a batch computes, the batch being formed stays open until that one should end (the recent
batches' duration), collecting every request that arrives meanwhile, up to ``batch_size``. Under load a
replica thus runs full batches back to back, and a lone request pays only the short wait. The forward pass
runs in a thread, so the replica keeps taking requests while it computes. ``batch_size`` 16: on 2 CPU
cores R50x1 at 224 runs 8 images/s one at a time, 20 at 8 and 21 at 16 per call, so 16 takes the gain with
a full batch under a second; on a GPU raise it (32-64).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from ray import serve

DEFAULT_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_S = 0.005
HOLD_TICK_S = 0.005


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
        self.counts = {"batches": 0, "images": 0, "forward_s": 0.0}
        self.batch_wait_s = batch_wait_s
        self.batch_s = 0.0
        """Recent batches' forward time (moving average): how long the batch being formed stays open."""
        self.busy_until = 0.0
        if warm_size is not None:
            self.forward(np.zeros((1, *warm_size, 3), np.uint8))

    def stats(self) -> dict:
        """Batches run, images in them, and seconds in the forward pass, since the replica started."""
        return dict(self.counts)

    def describe(self) -> dict:
        """Model id, task, output size, class names, and the side it was fine-tuned at (if known)."""
        return self.described

    @serve.batch(max_batch_size=DEFAULT_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def run(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 ``[h, w, 3]`` per request -> its float32 output row."""
        batch = np.stack(pixels)
        started = time.perf_counter()
        self.busy_until = started + self.batch_s
        holding = asyncio.create_task(self._hold_next_batch())
        try:
            outputs = await asyncio.to_thread(lambda: np.asarray(self.forward(batch), np.float32))
        finally:
            holding.cancel()
            self.run.set_batch_wait_timeout_s(self.batch_wait_s)
        took = time.perf_counter() - started
        self.batch_s = took if not self.counts["batches"] else 0.7 * self.batch_s + 0.3 * took
        self.counts["batches"] += 1
        self.counts["images"] += len(pixels)
        self.counts["forward_s"] += took
        return list(outputs)

    async def _hold_next_batch(self) -> None:
        """While a batch computes, a batch Serve starts forming waits until this one should end."""
        while True:
            left = self.busy_until - time.perf_counter()
            self.run.set_batch_wait_timeout_s(max(self.batch_wait_s, left))
            await asyncio.sleep(HOLD_TICK_S)
