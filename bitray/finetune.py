"""HyperRule fine-tuning on Ray Train: ``TensorflowTrainer`` + ``MultiWorkerMirroredStrategy``.

The driver lists the labelled set, resolves the HyperRule, opens (or resumes) the MLflow run and starts
the trainer; each worker streams its Ray Data shard, augments on the fly, and steps SGD with gradient
accumulation. Every ``checkpoint_every`` steps all workers call ``ray.train.report``; rank 0 attaches the
checkpoint (model, optimizer, step). After a worker dies, Ray Train restarts the group and the loop
resumes from ``ray.train.get_checkpoint()``; rerunning with the same ``name`` and ``storage_path`` does
the same after a driver crash. The data iterator restarts at a fresh shuffled epoch on resume (Ray Data
cannot restore a stream position); the step counter and LR schedule continue exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import bitray
from bitray import data as bdata
from bitray import hyperrule, ray_session, tracking
from bitray import storage as st
from bitray.config import FinetuneConfig, StorageConfig
from bitray.errors import BitrayError

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "ckpt"
STATE_FILE = "state.json"
SHUFFLE_BUFFER = 1024
CACHE_LIMIT_BYTES = 1 << 30


@dataclass(frozen=True)
class FinetuneResult:
    run_name: str
    mlflow_run_id: str
    steps: int
    val_top1: float | None
    feature_vector_uri: str
    classifier_uri: str
    registered_version: str | None
    checkpoint_path: str
    classes: list[str]
    seconds: float


def run_finetune(config: FinetuneConfig, *, address: str | None = None) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data`` with the HyperRule; export, log and register it."""
    started = time.monotonic()
    if not config.data:
        raise BitrayError("no training data given; pass --data URI (a class-folder tree or a manifest)")
    storage = _pinned_storage(config.storage)
    for part in (tracking.FEATURE_VECTOR, tracking.CLASSIFIER):
        if st.exists(st.join(config.output, part), storage):
            raise BitrayError(
                f"{st.join(config.output, part)!r} already exists; an export never overwrites a model: "
                "choose a new --output or remove the old one"
            )
    train_set, val_set = bdata.make_sets(
        config.data, config.validation, config.val_fraction, config.seed, storage
    )
    hp = hyperrule.resolve(
        len(train_set),
        bdata.image_size_of(train_set.paths[0], storage),
        boundaries=config.boundaries,
        total_steps=config.steps,
        base_lr=config.base_lr,
        momentum=config.momentum,
        batch_size=config.batch_size,
        micro_batch=config.micro_batch,
        mixup=config.mixup_alpha,
        resize=config.resize,
        crop=config.crop,
        variant=config.resolution,  # type: ignore[arg-type]
    )
    if hp.micro_batch % config.workers:
        raise BitrayError(
            f"micro_batch {hp.micro_batch} (global images per pass) must be divisible by workers "
            f"{config.workers}"
        )
    name = config.name or time.strftime("finetune-%Y%m%d-%H%M%S")
    tracking_uri = config.resolved_tracking_uri()
    run_id, resumed = tracking.start_or_resume_run(tracking_uri, config.experiment, name)
    log.info("%s MLflow run %s (%s) at %s", "resuming" if resumed else "started", run_id, name, tracking_uri)
    tracking.log_params(tracking_uri, run_id, _params(config, hp, train_set, val_set))

    ray_session.connect(address)
    try:
        result = _fit(config, hp, train_set, val_set, storage, name, tracking_uri, run_id)
        checkpoint = result.checkpoint
        if checkpoint is None:
            raise BitrayError(f"run {name!r} produced no checkpoint; see the Ray Train logs above")
        metrics = result.metrics or {}
        feature_uri, classifier_uri, version = _export_and_register(
            config, name, len(train_set.classes), checkpoint, storage, tracking_uri, run_id
        )
    except BaseException:
        with contextlib.suppress(Exception):  # the MLflow run shows the failure; rerun by name to resume
            tracking.finish_run(tracking_uri, run_id, status="FAILED")
        raise
    try:
        tags = {"bitray.checkpoint": checkpoint.path, "bitray.output": config.output}
        tracking.set_tags(tracking_uri, run_id, tags)
        tracking.finish_run(tracking_uri, run_id)
    except Exception as exc:  # the model is exported; a tracking hiccup must not turn success into failure
        log.warning("MLflow: could not close run %s (%s)", run_id, exc)
    return FinetuneResult(
        run_name=name,
        mlflow_run_id=run_id,
        steps=int(metrics.get("step", hp.total_steps)),
        val_top1=metrics.get("val/top1"),
        feature_vector_uri=feature_uri,
        classifier_uri=classifier_uri,
        registered_version=version,
        checkpoint_path=checkpoint.path,
        classes=train_set.classes,
        seconds=time.monotonic() - started,
    )


def _pinned_storage(storage: StorageConfig) -> StorageConfig:
    """Resolve the S3 endpoint on the driver: Ray workers may not share the driver's environment."""
    return storage.model_copy(update={"s3_endpoint": storage.resolved_s3_endpoint()})


def _params(
    config: FinetuneConfig,
    hp: hyperrule.HyperParams,
    train_set: bdata.LabelledSet,
    val_set: bdata.LabelledSet | None,
) -> dict[str, Any]:
    return {
        "model": config.model,
        "data": config.data,
        "validation": config.validation or f"{config.val_fraction:g} of data (seed {config.seed})",
        "train_size": len(train_set),
        "val_size": len(val_set) if val_set else 0,
        "num_classes": len(train_set.classes),
        "classes": ",".join(train_set.classes),
        "world_size": config.workers,
        "gpus_per_worker": config.gpus_per_worker,
        "bitray_version": bitray.__version__,
        **hp.as_params(),
    }


def _fit(
    config: FinetuneConfig,
    hp: hyperrule.HyperParams,
    train_set: bdata.LabelledSet,
    val_set: bdata.LabelledSet | None,
    storage: StorageConfig,
    name: str,
    tracking_uri: str,
    run_id: str,
):  # noqa: ANN202 - ray.train.Result
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    datasets = {"train": bdata.to_ray_dataset(train_set, hp.resize, storage, config.seed)}
    if val_set is not None:
        datasets["val"] = bdata.to_ray_dataset(val_set, hp.crop, storage, config.seed)
    decoded_bytes = len(train_set) * hp.resize**2 * 3 + (len(val_set) * hp.crop**2 * 3 if val_set else 0)
    cache = config.cache_decoded if config.cache_decoded is not None else decoded_bytes < CACHE_LIMIT_BYTES
    if cache:  # read and decode once, not once per epoch
        datasets = {key: ds.materialize() for key, ds in datasets.items()}
    loop_config = {
        "model": config.model,
        "num_classes": len(train_set.classes),
        "hyper": asdict(hp),
        "checkpoint_every": config.checkpoint_every,
        "eval_every": config.eval_every,
        "cpus_per_worker": config.cpus_per_worker,
        "storage": storage.model_dump(),
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "has_val": val_set is not None,
    }
    storage_path, storage_fs = _run_storage(config.storage_path, storage)
    use_gpu = config.gpus_per_worker > 0
    resources = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if use_gpu else {})}
    trainer = TensorflowTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )
    return trainer.fit()


def _run_storage(uri: str, storage: StorageConfig):  # noqa: ANN202 - (str, pyarrow fs | None)
    if st.is_remote(uri):
        fs, path = st.filesystem_for(uri, storage)
        return path, fs
    return str(st.local_path(uri)), None


# --- the per-worker training loop ---------------------------------------------------------------------


def train_loop(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (``TF_CONFIG`` set by ``TensorflowTrainer``)."""
    import ray.train
    import tensorflow as tf  # this module imported bitray first, so Keras 2 is selected
    import tf_keras

    from bitray.model import load_model

    threads = max(1, int(cfg["cpus_per_worker"]))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    hp = hyperrule.HyperParams(**cfg["hyper"])
    storage = StorageConfig(**cfg["storage"])
    num_classes = int(cfg["num_classes"])
    local_micro = hp.micro_batch // world
    accumulation = hp.accumulation_steps

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = load_model(cfg["model"], num_classes=num_classes, trainable=True, storage=storage).model
        optimizer = tf_keras.optimizers.SGD(learning_rate=0.0, momentum=hp.momentum)
        optimizer.build(model.trainable_variables)
    state = tf.train.Checkpoint(model=model, optimizer=optimizer)

    step = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            state.read(os.path.join(directory, CHECKPOINT_PREFIX)).assert_consumed()
            step = json.loads(Path(directory, STATE_FILE).read_text())["step"]

    train_step = _make_train_step(strategy, model, optimizer, hp.batch_size, accumulation)
    predict = tf.function(lambda x: tf.argmax(model(x, training=False), axis=-1))
    all_sum = _make_all_sum(strategy)
    logger = tracking.MetricLogger(cfg["tracking_uri"], cfg["run_id"]) if rank == 0 else None
    if logger is not None and restored is not None:
        logger.set_tag("bitray.resumed_from_step", str(step))

    rng = np.random.default_rng()  # augmentation is random on purpose, not seeded
    batches = _endless_batches(ray.train.get_dataset_shard("train"), local_micro)
    val_shard = ray.train.get_dataset_shard("val") if cfg["has_val"] else None
    eye = np.eye(num_classes, dtype=np.float32)
    tick = time.perf_counter()
    try:
        while step < hp.total_steps:
            lr = hp.lr(step)
            optimizer.learning_rate.assign(lr)
            images, targets = [], []
            for _ in range(accumulation):
                batch = next(batches)
                x = bdata.random_crop_flip(batch["image"], hp.crop, rng)
                x, y = bdata.mixup(x, eye[batch["label"]], hp.mixup_alpha, rng)
                images.append(x)
                targets.append(y)
            loss, correct = train_step(np.stack(images), np.stack(targets))
            step += 1
            now = time.perf_counter()
            metrics: dict[str, float] = {
                "train/loss": float(loss),
                "train/top1": float(correct) / hp.batch_size,
                "train/lr": lr,
                "train/images_per_s": hp.batch_size / (now - tick),
            }
            tick = now
            if val_shard is not None and (step % cfg["eval_every"] == 0 or step == hp.total_steps):
                metrics["val/top1"] = _evaluate(all_sum, predict, val_shard, local_micro)
                tick = time.perf_counter()  # evaluation time is not training throughput
            if step % cfg["checkpoint_every"] == 0 or step == hp.total_steps:
                metrics["checkpoint/step"] = step
                _report(state, step, {**metrics, "step": step}, rank)
                tick = time.perf_counter()
            if logger is not None:
                logger.log_metrics(metrics, step)
    finally:
        if logger is not None:
            logger.close()


def _make_train_step(strategy, model, optimizer, global_batch: int, accumulation: int):  # noqa: ANN001, ANN202
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


def _endless_batches(shard, batch_size: int):  # noqa: ANN001, ANN202
    """This worker's micro-batches, epoch after epoch, locally shuffled; equal counts on every worker."""
    while True:
        yield from shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=SHUFFLE_BUFFER,
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


# --- after training: export, log, register ------------------------------------------------------------


def _export_and_register(
    config: FinetuneConfig,
    run_name: str,
    num_classes: int,
    checkpoint,  # noqa: ANN001 - ray.train.Checkpoint
    storage: StorageConfig,
    tracking_uri: str,
    run_id: str,
) -> tuple[str, str, str | None]:
    """Rebuild the model from the final checkpoint, export both SavedModels, upload, log and register."""
    import tensorflow as tf

    from bitray.model import load_model
    from bitray.model.export import export_savedmodel

    loaded = load_model(config.model, num_classes=num_classes, storage=storage)
    # the exported model names its origin: base weights (random-init stays visible) and this fine-tune
    loaded = dataclasses.replace(loaded, model_id=f"{loaded.model_id}+finetune:{run_name}")
    with checkpoint.as_directory() as directory:
        saved = tf.train.Checkpoint(model=loaded.model)
        saved.read(os.path.join(directory, CHECKPOINT_PREFIX)).expect_partial()
    with tempfile.TemporaryDirectory(prefix="bitray-export-") as tmp:
        feature_dir = export_savedmodel(loaded, Path(tmp, tracking.FEATURE_VECTOR), classifier=False)
        classifier_dir = export_savedmodel(loaded, Path(tmp, tracking.CLASSIFIER), classifier=True)
        feature_uri = st.join(config.output, tracking.FEATURE_VECTOR)
        classifier_uri = st.join(config.output, tracking.CLASSIFIER)
        _upload_dir(feature_dir, feature_uri, storage)
        _upload_dir(classifier_dir, classifier_uri, storage)
        try:
            version = tracking.log_final_model(
                tracking_uri,
                run_id,
                feature_dir,
                classifier_dir,
                registered_model=config.registered_model,
                alias=config.model_alias,
            )
        except Exception as exc:  # the model is safe in config.output; tracking must not lose it
            log.warning("MLflow: could not log/register the final model (%s); it is in %s", exc, feature_uri)
            version = None
    return feature_uri, classifier_uri, version


def _upload_dir(source: Path, uri: str, storage: StorageConfig) -> None:
    import pyarrow.fs as pafs

    fs, path = st.filesystem_for(uri, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(
            str(source), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
        )
    except OSError as exc:
        raise BitrayError(f"cannot write the exported model to {uri!r}: {exc}") from None
