"""The per-worker training loop: runs on every Ray Train worker (``TF_CONFIG`` set by ``TensorflowTrainer``).

Each worker opens its data source (``inputs``: the set held in memory, or a Ray Data stream), prepares
the next step's augmented batch on a background thread while the current step runs, and steps SGD with
gradient accumulation. Every ``checkpoint_every`` steps all workers evaluate on the validation set and
call ``ray.train.report``; rank 0 attaches the checkpoint (model, optimizer, step), ranked by validation
top-1 so that the best one is kept. After a worker dies, Ray Train restarts the group and the loop
resumes from ``ray.train.get_checkpoint()``: the step counter and LR schedule continue exactly, and so
does the data order of a set held in memory (a function of the step); a stream starts a fresh epoch.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitray import hyperrule, tracking
from bitray.config import StorageConfig
from bitray.finetune.augment import eval_images
from bitray.finetune.inputs import Source, Worker
from bitray.finetune.progress import Progress

CHECKPOINT_PREFIX = "ckpt"
STATE_FILE = "state.json"
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
    source: Source
    """Where the batches come from: ``inputs.InMemory`` or ``inputs.Streamed``."""
    seed: int = 0
    progress_bar: bool = False
    """Draw a live bar (the driver is in a terminal) instead of a log line every 30 s."""


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

    source = cfg.source.open(Worker(hp, cfg.num_classes, rank, world, cfg.seed))
    upcoming = itertools.count(step)  # the prefetch thread prepares steps in order from the resumed one
    inputs = Prefetcher(lambda: source.step_inputs(next(upcoming)))  # augmentation overlaps the step
    progress = Progress(step, hp.total_steps, cfg.progress_bar) if rank == 0 else None
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
            if cfg.has_val and (step % cfg.eval_every == 0 or checkpoint_now):
                metrics[VAL_TOP1] = _evaluate(all_sum, predict, source.validation(local_micro))
                tick = time.perf_counter()  # evaluation time is not training throughput
            if checkpoint_now:
                metrics["checkpoint/step"] = step
                _report(state, step, {**metrics, "step": step}, rank)
                tick = time.perf_counter()
            if logger is not None:
                logger.log_metrics(metrics, step)
            if progress is not None:
                progress.update(step, metrics["train/loss"], metrics["train/images_per_s"])
    finally:
        inputs.stop()
        if progress is not None:
            progress.close()
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


def _make_all_sum(strategy):  # noqa: ANN001, ANN202
    """Sum a small vector over all workers (a collective: every worker must call it)."""
    import tensorflow as tf

    @tf.function
    def all_sum(values):  # noqa: ANN001, ANN202
        per_replica = strategy.run(lambda: tf.identity(values))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return all_sum


def _evaluate(all_sum, predict, batches) -> float:  # noqa: ANN001
    """Top-1 over the whole validation set: each worker scores its share, counts summed across workers."""
    correct = total = 0
    for images, labels in batches:
        predicted = predict(eval_images(images)).numpy()
        correct += int(np.sum(predicted == labels))
        total += len(labels)
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
