"""The per-worker training loop: runs on every Ray Train worker (``TF_CONFIG`` set by ``TensorflowTrainer``).

Each worker streams its Ray Data shard, augments on the fly, and steps SGD with gradient accumulation.
Every ``checkpoint_every`` steps all workers evaluate on the validation set and call ``ray.train.report``;
rank 0 attaches the checkpoint (model, optimizer, step), ranked by validation top-1 so that the best one
is kept. After a worker dies, Ray Train restarts the group and the loop resumes from
``ray.train.get_checkpoint()``. The data iterator restarts at a fresh shuffled epoch on resume (Ray Data
cannot restore a stream position); the step counter and LR schedule continue exactly.
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitray import data as bdata
from bitray import hyperrule, tracking
from bitray.config import StorageConfig
from bitray.errors import BitrayError

CHECKPOINT_PREFIX = "ckpt"
STATE_FILE = "state.json"
SHUFFLE_BUFFER = 1024
VAL_TOP1 = "val/top1"


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs, typed: what the driver resolved, not the user's raw config."""

    model: str
    num_classes: int
    hyper: hyperrule.HyperParams
    checkpoint_every: int
    eval_every: int
    cpus_per_worker: float
    storage: StorageConfig
    tracking_uri: str
    run_id: str
    has_val: bool
    shuffle_buffer: int = SHUFFLE_BUFFER
    """Rows of the local shuffle buffer; 0 when the dataset is shuffled globally every epoch."""


def train_loop(train_loop_config: dict[str, LoopConfig]) -> None:
    """Ray Train's entry point; ``train_loop_config`` is ``{"loop": LoopConfig}``."""
    run_loop(train_loop_config["loop"])


def run_loop(cfg: LoopConfig) -> None:
    import ray.train
    import tensorflow as tf  # bitray was imported first, so Keras 2 is selected
    import tf_keras

    from bitray.model import load_model

    threads = max(1, int(cfg.cpus_per_worker))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    hp = cfg.hyper
    local_micro = hp.micro_batch // world
    accumulation = hp.accumulation_steps

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = load_model(cfg.model, num_classes=cfg.num_classes, trainable=True, storage=cfg.storage).model
        optimizer = tf_keras.optimizers.SGD(learning_rate=0.0, momentum=hp.momentum)
        optimizer.build(model.trainable_variables)
    state = tf.train.Checkpoint(model=model, optimizer=optimizer)

    step = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            state.read(os.path.join(directory, CHECKPOINT_PREFIX)).assert_consumed()
            step = json.loads(Path(directory, STATE_FILE).read_text())["step"]

    train_step = make_train_step(strategy, model, optimizer, hp.batch_size, accumulation)
    predict = tf.function(lambda x: tf.argmax(model(x, training=False), axis=-1))
    all_sum = _make_all_sum(strategy)
    logger = tracking.MetricLogger(cfg.tracking_uri, cfg.run_id) if rank == 0 else None
    if logger is not None and restored is not None:
        logger.set_tag("bitray.resumed_from_step", str(step))

    rng = np.random.default_rng()  # augmentation is random on purpose, not seeded
    batches = endless_batches(ray.train.get_dataset_shard("train"), local_micro, cfg.shuffle_buffer)
    val_shard = ray.train.get_dataset_shard("val") if cfg.has_val else None
    eye = np.eye(cfg.num_classes, dtype=np.float32)

    def next_step_inputs() -> tuple[np.ndarray, np.ndarray]:
        micro = [next(batches) for _ in range(accumulation)]
        images = np.stack([bdata.random_crop_flip(b["image"], hp.crop, rng) for b in micro])
        targets = np.stack([eye[b["label"]] for b in micro])
        return mixup_step(images, targets, hp.mixup_alpha, rng)

    inputs = Prefetcher(next_step_inputs)  # reading, augmenting and MixUp overlap the step
    tick = time.perf_counter()
    try:
        while step < hp.total_steps:
            lr = hp.lr(step)
            optimizer.learning_rate.assign(lr)
            loss, correct = train_step(*inputs.next())
            step += 1
            now = time.perf_counter()
            metrics: dict[str, float] = {
                "train/loss": float(loss),
                "train/top1": float(correct) / hp.batch_size,
                "train/lr": lr,
                "train/images_per_s": hp.batch_size / (now - tick),
            }
            tick = now
            checkpoint_now = step % cfg.checkpoint_every == 0 or step == hp.total_steps
            if val_shard is not None and (step % cfg.eval_every == 0 or checkpoint_now):
                metrics[VAL_TOP1] = _evaluate(all_sum, predict, val_shard, local_micro)
                tick = time.perf_counter()  # evaluation time is not training throughput
            if checkpoint_now:
                metrics["checkpoint/step"] = step
                _report(state, step, {**metrics, "step": step}, rank)
                tick = time.perf_counter()
            if logger is not None:
                logger.log_metrics(metrics, step)
    finally:
        inputs.stop()
        if logger is not None:
            logger.close()


class Prefetcher:
    """Calls ``produce`` on a background thread, ``depth`` results ahead of ``next()``.

    TensorFlow releases the GIL while it runs a step, so the next step's batch is read, cropped, flipped
    and mixed meanwhile. An exception in ``produce`` is raised by the ``next()`` that would have got its
    result.
    """

    def __init__(self, produce, depth: int = 2) -> None:  # noqa: ANN001 - () -> T
        self._produce = produce
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bitray-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                item = (True, self._produce())
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                item = (False, exc)
            while not self._stopped.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return

    def next(self):  # noqa: ANN201 - T
        ok, value = self._queue.get()
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self._stopped.set()


def mixup_step(
    images: np.ndarray, targets: np.ndarray, alpha: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """MixUp over one optimizer step's images ``[micro-batches, n, ...]``: one lambda for the whole step,
    partners drawn across its micro-batches, as the reference mixes its one batch."""
    if alpha <= 0:
        return images, targets
    shape, target_shape = images.shape, targets.shape
    flat_x, flat_y = bdata.mixup(
        images.reshape(-1, *shape[2:]), targets.reshape(-1, *target_shape[2:]), alpha, rng
    )
    return flat_x.reshape(shape), flat_y.reshape(target_shape)


def make_train_step(strategy, model, optimizer, global_batch: int, accumulation: int):  # noqa: ANN001, ANN201
    """One optimizer step over ``accumulation`` micro-batches ``x[i]``, gradients summed, then all-reduced.

    Each replica's loss is its summed cross-entropy over the *global* batch size, so the all-reduced
    gradient is the mean over the global batch whatever the number of workers or micro-batches.
    """
    import tensorflow as tf

    def replica_step(x, y):  # noqa: ANN001, ANN202
        variables = model.trainable_variables
        grads = [tf.zeros_like(v) for v in variables]
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0.0)
        for i in tf.range(accumulation):
            with tf.GradientTape() as tape:
                logits = model(x[i], training=True)
                loss = tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(y[i], logits)) / global_batch
            micro = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            grads = [g + m for g, m in zip(grads, micro, strict=True)]
            loss_sum += loss
            hits = tf.equal(tf.argmax(logits, -1), tf.argmax(y[i], -1))
            correct += tf.reduce_sum(tf.cast(hits, tf.float32))
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return tf.stack([loss_sum, correct])

    @tf.function
    def step(x, y):  # noqa: ANN001, ANN202
        totals = strategy.run(replica_step, args=(x, y))
        return tuple(tf.unstack(strategy.reduce(tf.distribute.ReduceOp.SUM, totals, axis=None)))

    return step


def endless_batches(shard, batch_size: int, shuffle_buffer: int = SHUFFLE_BUFFER):  # noqa: ANN001, ANN201
    """This worker's micro-batches, epoch after epoch (``shuffle_buffer`` rows shuffled locally, 0: none);
    equal counts on every worker.

    The driver repeats a small set until an epoch holds a global micro-batch, so an epoch without a
    single batch means the shard's images could not be decoded: that fails at once, never loops.
    """
    while True:
        formed = 0
        for batch in shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=shuffle_buffer or None,
        ):
            formed += 1
            yield batch
        if not formed:
            raise BitrayError(
                f"cannot form a batch of {batch_size} images on this worker: a whole epoch of its share "
                "of the training set gave fewer decodable images; check the warnings about skipped images"
            )


def _make_all_sum(strategy):  # noqa: ANN001, ANN202
    """Sum a small vector over all workers (a collective: every worker must call it)."""
    import tensorflow as tf

    @tf.function
    def all_sum(values):  # noqa: ANN001, ANN202
        per_replica = strategy.run(lambda: tf.identity(values))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return all_sum


def _evaluate(all_sum, predict, shard, batch_size: int) -> float:  # noqa: ANN001
    """Top-1 over the whole validation set: each worker scores its shard, counts summed across workers."""
    correct = total = 0
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        predicted = predict(bdata.eval_images(batch["image"])).numpy()
        correct += int(np.sum(predicted == batch["label"]))
        total += len(batch["label"])
    summed = all_sum(np.array([correct, total], np.float32)).numpy()
    return float(summed[0] / max(summed[1], 1.0))


def _report(state, step: int, metrics: dict[str, float], rank: int) -> None:  # noqa: ANN001
    """Every worker writes (MWMS may need all of them) and reports; rank 0's copy becomes the checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="bitray-ckpt-") as directory:
        state.write(os.path.join(directory, CHECKPOINT_PREFIX))
        Path(directory, STATE_FILE).write_text(json.dumps({"step": step}))
        checkpoint = Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)
