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
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ray import serve

DEFAULT_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_S = 0.005
HOLD_TICK_S = 0.005
RETRY_S = 60.0
"""A model that could not be loaded is tried again at most this often (per replica)."""


@dataclass
class Held:
    """A loaded model: its traced forward pass, its description, and since when the index serves it."""

    forward: Callable
    described: dict
    since: float


class ModelServer:
    """A feature-vector model (``task="embed"``: features) or a classifier (``"classify"``: probabilities).

    The embedding model follows the index: a request may name the model it wants (``want``: the spec, the
    model id and since when the search deployment serves it). A replica loads a newer wanted model once, in
    a thread while it keeps serving the old one, then swaps and drops the old one; requests meanwhile wait
    for the load, not for a redeploy. A model that cannot be loaded (or loads other weights than wanted)
    leaves the replica on its model, remembered for ``RETRY_S`` so it is not retried per request."""

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
        from bitray.config import StorageConfig
        from bitray.embed.actor import configure_tensorflow

        configure_tensorflow(threads=threads)  # also: GPU memory grows on demand, not all at once
        self.task = task
        self.storage = StorageConfig.model_validate_json(storage_json) if storage_json else None
        forward, described = self._load(spec, expect_model_id, warm_size)
        self.held = {described["model"]: Held(forward, described, 0.0)}
        """The models loaded, by model id: the one served and, during a switch, the one coming (at most 2)."""
        self.loading = asyncio.Lock()
        self.failed: dict[str, tuple[str, float]] = {}
        self.run_batch.set_max_batch_size(batch_size)
        self.run_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.counts = {"batches": 0, "images": 0, "forward_s": 0.0, "loads": 0}
        self.batch_wait_s = batch_wait_s
        self.batch_s = 0.0
        """Recent batches' forward time (moving average): how long the batch being formed stays open."""
        self.busy_until = 0.0

    def _load(self, spec: str, expect_model_id: str | None, warm_size: tuple[int, int] | None):  # noqa: ANN202
        """The traced forward pass of ``spec`` and its description; ``BitrayError`` when it cannot be."""
        import tensorflow as tf

        from bitray.errors import BitrayError
        from bitray.model import load_model

        task = self.task
        loaded = load_model(spec, storage=self.storage, classifier=task == "classify")
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
        forward = tf.function(fn, input_signature=signature)
        names = loaded.class_names or (
            [str(i) for i in range(loaded.num_classes)] if loaded.num_classes else None
        )
        described = {
            "model": loaded.model_id,
            "spec": spec,
            "task": task,
            "dim": loaded.feature_dim if task == "embed" else loaded.num_classes,
            "labels": names if task == "classify" else None,
            "image_size": loaded.image_size,
        }
        if warm_size is not None:
            forward(np.zeros((1, *warm_size, 3), np.uint8))
        return forward, described

    @property
    def newest(self) -> Held:
        return max(self.held.values(), key=lambda held: held.since)

    async def use(
        self, spec: str, model_id: str, since: float = 0.0, warm_size: tuple[int, int] | None = None
    ) -> dict | str:
        """Hold ``model_id`` (loaded from ``spec``), served since ``since``: its description, or why it
        cannot be loaded. The model held longest goes when a third would be held."""
        from bitray.errors import BitrayError

        async with self.loading:  # concurrent requests for the new model wait for one load
            if model_id in self.held:
                held = self.held[model_id]
                held.since = max(held.since, since)
                return held.described
            failed = self.failed.get(model_id)
            if failed is not None and time.monotonic() - failed[1] < RETRY_S:
                return failed[0]
            try:
                forward, described = await asyncio.to_thread(self._load, spec, model_id, warm_size)
            except BitrayError as exc:
                self.failed[model_id] = (f"model {spec!r} cannot be served: {exc}", time.monotonic())
                return self.failed[model_id][0]
            self.held[model_id] = Held(forward, described, since)
            self.counts["loads"] += 1
            if len(self.held) > 2:
                self._drop(min(self.held, key=lambda key: self.held[key].since))
            return described

    def _drop(self, model_id: str) -> None:
        del self.held[model_id]  # a batch running on it keeps its own reference until it ends
        gc.collect()  # the weights go now, not at some later collection

    def stats(self) -> dict:
        """Batches run, images in them, seconds in the forward pass and models loaded since it started."""
        return {**self.counts, "held": sorted(self.held)}

    def describe(self) -> dict:
        """Model id and spec, task, output size, class names, and the side it was fine-tuned at (if known)."""
        return self.newest.described

    async def run(
        self, pixels: np.ndarray, want: tuple[str, str, float] | None = None
    ) -> tuple[np.ndarray, str]:
        """uint8 ``[h, w, 3]`` -> (its float32 output row, the model id that made it).

        ``want``: (spec, model id, since when the search deployment serves it). A wanted model not held
        and newer than those held is loaded first; once it is wanted, models served before it are dropped.
        An older want (an ingress that has not seen a switch yet) runs on the newest model held, which the
        answer names, so the search deployment can tell."""
        if want is not None and want[1] not in self.held and want[2] > self.newest.since:
            await self.use(*want)
        chosen = self.held.get(want[1]) if want is not None else None
        if chosen is not None and want[2] >= chosen.since:
            chosen.since = want[2]
            for model_id in [key for key, held in self.held.items() if held.since < want[2]]:
                self._drop(model_id)  # the index moved on from it
        return await self.run_batch(pixels, (chosen or self.newest).described["model"])

    @serve.batch(max_batch_size=DEFAULT_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def run_batch(self, pixels: list[np.ndarray], models: list[str]) -> list[tuple[np.ndarray, str]]:
        """Requests batched by Serve, each through the model it names (one forward pass per model)."""
        started = time.perf_counter()
        self.busy_until = started + self.batch_s
        holding = asyncio.create_task(self._hold_next_batch())
        answers: list = [None] * len(pixels)
        try:
            for model_id in dict.fromkeys(models):
                held = self.held.get(model_id) or self.newest  # dropped meanwhile: the newest
                rows = [i for i, wanted in enumerate(models) if wanted == model_id]
                batch = np.stack([pixels[i] for i in rows])
                outputs = await asyncio.to_thread(lambda: np.asarray(held.forward(batch), np.float32))  # noqa: B023
                for i, row in zip(rows, outputs, strict=True):
                    answers[i] = (row, held.described["model"])
        finally:
            holding.cancel()
            self.run_batch.set_batch_wait_timeout_s(self.batch_wait_s)
        took = time.perf_counter() - started
        self.batch_s = took if not self.counts["batches"] else 0.7 * self.batch_s + 0.3 * took
        self.counts["batches"] += 1
        self.counts["images"] += len(pixels)
        self.counts["forward_s"] += took
        return answers

    async def _hold_next_batch(self) -> None:
        """While a batch computes, a batch Serve starts forming waits until this one should end."""
        while True:
            left = self.busy_until - time.perf_counter()
            self.run_batch.set_batch_wait_timeout_s(max(self.batch_wait_s, left))
            await asyncio.sleep(HOLD_TICK_S)
