"""The fine-tune driver: list, resolve, train on Ray Train, pick the checkpoint, evaluate, export, promote.

The driver lists the labelled set (optionally a seeded few-shot draw), picks the resolution from the
median area of a seeded header-only sample, resolves the HyperRule, opens (or resumes) the MLflow run and
starts the trainer (``bitray.finetune.loop``). After training it rebuilds the chosen checkpoint (the best
by validation top-1, or the last), evaluates it on the validation set (``evaluation``), exports both
SavedModels with the class names, logs the pyfunc and registers it, moving the alias on merit
(``promotion``). Rerunning with the same ``name`` and ``storage_path`` resumes after a driver crash.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import bitray
from bitray import hyperrule, ray_session, tracking
from bitray import storage as st
from bitray.config import FinetuneConfig, StorageConfig
from bitray.errors import BitrayError
from bitray.finetune import evaluation, promotion
from bitray.finetune.data import LabelledSet, few_shot, make_sets, median_image_area
from bitray.finetune.decode import decode_into_memory, to_ray_dataset
from bitray.finetune.inputs import SHUFFLE_BUFFER, InMemory, Streamed
from bitray.finetune.loop import CHECKPOINT_PREFIX, VAL_TOP1, LoopConfig, train_loop
from bitray.model import pyfunc, registry
from bitray.redaction import redacted

log = logging.getLogger(__name__)

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
    exported_step: int | None = None
    promoted: bool | None = None


def run_finetune(config: FinetuneConfig, *, address: str | None = None) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data`` with the HyperRule; evaluate, export, log, register."""
    started = time.monotonic()
    if not config.data:
        raise BitrayError("no training data given; pass --data URI (a class-folder tree or a manifest)")
    storage = config.storage.model_copy(update={"s3_endpoint": config.storage.resolved_s3_endpoint()})
    for part in (registry.FEATURE_VECTOR, registry.CLASSIFIER):
        if st.exists(st.join(config.output, part), storage):
            raise BitrayError(
                f"{st.join(config.output, part)!r} already exists; an export never overwrites a model: "
                "choose a new --output or remove the old one"
            )
    train_set, val_set = make_sets(config.data, config.validation, config.val_fraction, config.seed, storage)
    if config.examples_per_class is not None:
        train_set = few_shot(train_set, config.examples_per_class, config.seed)
    areas = median_image_area(train_set.paths, storage, config.resolution_sample, config.seed)
    hp = hyperrule.resolve(config, len(train_set), areas.median_area)
    rule = hyperrule.resolution_for_area(areas.median_area, config.resolution)  # type: ignore[arg-type]
    log.info(
        "resolution: median area %.0f px over %d sampled images (%d skipped): the rule says resize %d, "
        "crop %d; using resize %d, crop %d",
        areas.median_area,
        areas.sampled,
        areas.skipped,
        *rule,
        hp.resize,
        hp.crop,
    )
    if hp.micro_batch % config.workers:
        raise BitrayError(
            f"micro_batch {hp.micro_batch} (global images per pass) must be divisible by workers "
            f"{config.workers}"
        )
    name = config.name or time.strftime("finetune-%Y%m%d-%H%M%S")
    storage_path, storage_fs = _run_storage(config.storage_path, storage)
    tracking_uri = config.resolved_tracking_uri()
    identity = config.storage_path if st.is_remote(config.storage_path) else storage_path
    run_id, resumed = tracking.start_or_resume_run(tracking_uri, config.experiment, name, identity)
    action = "resuming" if resumed else "started"
    log.info("%s MLflow run %s (%s) at %s", action, run_id, name, redacted(tracking_uri))
    params = _params(config, hp, train_set, val_set)
    params.update(resolution_median_area=round(areas.median_area), resolution_sampled=areas.sampled)
    tracking.log_params(tracking_uri, run_id, params)

    ray_session.connect(address)
    try:
        source, datasets = _data_source(config, hp, storage, train_set, val_set)
        loop = LoopConfig(
            model=config.model,
            num_classes=len(train_set.classes),
            hyper=hp,
            checkpoint_every=config.checkpoint_every,
            eval_every=config.eval_every,
            cpus_per_worker=config.cpus_per_worker,
            storage=storage,
            tracking_uri=tracking_uri,
            run_id=run_id,
            has_val=val_set is not None,
            source=source,
            seed=config.seed,
            progress_bar=sys.stderr.isatty(),
        )
        result = _fit(config, loop, datasets, name, storage_path, storage_fs)
        checkpoint, metrics = _chosen_checkpoint(result, config.export)
        exported = _export_and_register(config, name, train_set, val_set, hp, checkpoint, metrics, run_id)
    except BaseException:
        try:  # the MLflow run shows the failure; rerun by name to resume
            tracking.finish_run(tracking_uri, run_id, status="FAILED")
        except Exception as exc:  # noqa: BLE001 - the training error is the one to raise
            log.warning("MLflow: could not mark run %s failed (%s)", run_id, exc)
        raise
    try:
        tags = {"bitray.checkpoint": checkpoint.path, "bitray.output": config.output}
        tracking.set_tags(tracking_uri, run_id, tags)
        tracking.finish_run(tracking_uri, run_id)
    except Exception as exc:  # the model is exported; a tracking hiccup must not turn success into failure
        log.warning("MLflow: could not close run %s (%s)", run_id, exc)
    final = result.metrics or {}
    return FinetuneResult(
        run_name=name,
        mlflow_run_id=run_id,
        steps=int(final.get("step", hp.total_steps)),
        val_top1=metrics.get(VAL_TOP1),
        feature_vector_uri=exported["feature_vector"],
        classifier_uri=exported["classifier"],
        registered_version=exported["version"],
        checkpoint_path=checkpoint.path,
        classes=train_set.classes,
        seconds=time.monotonic() - started,
        exported_step=metrics.get("step"),
        promoted=exported["promoted"],
    )


def _params(
    config: FinetuneConfig,
    hp: hyperrule.HyperParams,
    train_set: LabelledSet,
    val_set: LabelledSet | None,
) -> dict[str, Any]:
    return {
        "model": config.model,
        "data": config.data,
        "validation": config.validation or f"{config.val_fraction:g} of data (seed {config.seed})",
        "train_size": len(train_set),
        "val_size": len(val_set) if val_set else 0,
        "val_digest": val_set.digest() if val_set else "none",
        "examples_per_class": config.examples_per_class or "all",
        "num_classes": len(train_set.classes),
        "classes": ",".join(train_set.classes),
        "world_size": config.workers,
        "gpus_per_worker": config.gpus_per_worker,
        "bitray_version": bitray.__version__,
        **hp.as_params(),
    }


def _fit(
    config: FinetuneConfig,
    loop: LoopConfig,
    datasets: dict[str, Any],
    name: str,
    storage_path: str,
    storage_fs,  # noqa: ANN001 - pyarrow fs | None
):  # noqa: ANN202 - ray.train.Result
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    use_gpu = config.gpus_per_worker > 0
    resources = {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if use_gpu else {})}
    ranked = {"checkpoint_score_attribute": VAL_TOP1, "checkpoint_score_order": "max"} if loop.has_val else {}
    trainer = TensorflowTrainer(
        train_loop,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2, **ranked),
        ),
        datasets=datasets,
    )
    return trainer.fit()


def _data_source(
    config: FinetuneConfig,
    hp: hyperrule.HyperParams,
    storage: StorageConfig,
    train_set: LabelledSet,
    val_set: LabelledSet | None,
) -> tuple[InMemory | Streamed, dict[str, Any]]:
    """The workers' data source, and the Ray Data datasets the trainer streams (none for ``InMemory``).

    Pixels that fit (under ``CACHE_LIMIT_BYTES`` and half the object store) are decoded once, now, while
    no worker holds a CPU, and put in the object store. Otherwise Ray Data decodes every epoch while the
    workers train, which needs CPUs the workers do not hold: checked here, or the run would wait for ever.
    """
    import ray

    exact = config.decode == "exact"
    decoded_bytes = len(train_set) * hp.resize**2 * 3 + (len(val_set) * hp.crop**2 * 3 if val_set else 0)
    budget = min(CACHE_LIMIT_BYTES, ray.available_resources().get("object_store_memory", 0) / 2)
    fits = config.cache_decoded if config.cache_decoded is not None else decoded_bytes < budget
    log.info(
        "data: %s (decoded set about %.2f GiB, budget %.2f GiB)",
        "decoded once, held in memory" if fits else "streamed, decoded every epoch",
        decoded_bytes / 2**30,
        budget / 2**30,
    )
    if fits:
        images, labels = decode_into_memory(train_set, hp.resize, storage, exact)
        refs = [ray.put(images), ray.put(labels)]
        if val_set is not None:
            val_images, val_labels = decode_into_memory(val_set, hp.crop, storage, exact)
            refs += [ray.put(val_images), ray.put(val_labels)]
        return InMemory(*refs), {}
    _check_cpus_for_streaming(config)
    # the encoded bytes are kept (each file read once); a small set is repeated to fill a global micro-batch
    datasets = {"train": to_ray_dataset(train_set, hp.resize, storage, config.seed, hp.micro_batch, exact)}
    if config.shuffle == "global":  # re-executed by every epoch: a fresh permutation of the whole set
        datasets["train"] = datasets["train"].random_shuffle()
    if val_set is not None:
        datasets["val"] = to_ray_dataset(val_set, hp.crop, storage, config.seed, exact=exact)
    shuffle_buffer = 0 if config.shuffle == "global" else SHUFFLE_BUFFER
    return Streamed(shuffle_buffer, has_val=val_set is not None), datasets


DATA_CPUS = 1
"""CPUs a streamed run leaves beside its workers for the Ray Data tasks that read and decode."""


def _check_cpus_for_streaming(config: FinetuneConfig) -> None:
    import ray

    held = config.workers * config.cpus_per_worker
    total = ray.cluster_resources().get("CPU", 0)
    if total < held + DATA_CPUS:
        raise BitrayError(
            f"streaming the training set needs {held + DATA_CPUS:g} CPUs: {config.workers} worker(s) x "
            f"{config.cpus_per_worker:g} CPU plus {DATA_CPUS} for the Ray Data tasks that decode every "
            f"epoch, but the Ray cluster has {total:g}; use fewer --workers or cpus_per_worker, a "
            "larger cluster, or let the decoded set be held in memory (cache_decoded: true)"
        )


def _chosen_checkpoint(result, export: str):  # noqa: ANN001, ANN202 - ray.train types
    """``(checkpoint, its metrics)``: the best kept one by validation top-1 (latest on ties), or the last."""
    if result.checkpoint is None:
        raise BitrayError("the run produced no checkpoint; see the Ray Train logs above")
    last = (result.checkpoint, result.metrics or {})
    if export == "last":
        return last
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(VAL_TOP1) is not None]
    if not scored:
        return last
    return max(scored, key=lambda pair: (pair[1][VAL_TOP1], pair[1].get("step", 0)))


def _run_storage(uri: str, storage: StorageConfig):  # noqa: ANN202 - (str, pyarrow fs | None)
    if st.is_remote(uri):
        fs, path = st.filesystem_for(uri, storage)
        return path, fs
    return str(st.local_path(uri)), None


# --- after training: evaluate, export, log, register --------------------------------------------------


def _export_and_register(
    config: FinetuneConfig,
    run_name: str,
    train_set: LabelledSet,
    val_set: LabelledSet | None,
    hp: hyperrule.HyperParams,
    checkpoint,  # noqa: ANN001 - ray.train.Checkpoint
    metrics: dict[str, Any],
    run_id: str,
) -> dict[str, Any]:
    """Rebuild the chosen checkpoint; evaluate it, export both SavedModels, upload, log and register."""
    import tensorflow as tf

    from bitray.model import load_model
    from bitray.model.export import export_savedmodel

    storage = config.storage.model_copy(update={"s3_endpoint": config.storage.resolved_s3_endpoint()})
    tracking_uri = config.resolved_tracking_uri()
    loaded = load_model(config.model, num_classes=len(train_set.classes), storage=storage)
    # the exported model names its origin: base weights (random-init stays visible) and this fine-tune
    loaded = dataclasses.replace(
        loaded,
        model_id=f"{loaded.model_id}+finetune:{run_name}",
        class_names=list(train_set.classes),
        image_size=hp.crop,
    )
    with checkpoint.as_directory() as directory:
        saved = tf.train.Checkpoint(model=loaded.model)
        saved.read(os.path.join(directory, CHECKPOINT_PREFIX)).expect_partial()
    report = None
    if val_set is not None:
        infer = loaded.inference_function()
        report = evaluation.evaluate(
            lambda x: infer(x).numpy(), val_set, hp.crop, storage, exact=config.decode == "exact"
        )
        _log_evaluation(report, hp.crop, storage, tracking_uri, run_id, metrics.get("step"))
    with tempfile.TemporaryDirectory(prefix="bitray-export-") as tmp:
        feature_dir = export_savedmodel(loaded, Path(tmp, registry.FEATURE_VECTOR), classifier=False)
        classifier_dir = export_savedmodel(loaded, Path(tmp, registry.CLASSIFIER), classifier=True)
        out = {
            "feature_vector": st.join(config.output, registry.FEATURE_VECTOR),
            "classifier": st.join(config.output, registry.CLASSIFIER),
            "version": None,
            "promoted": None,
        }
        _upload_dir(Path(feature_dir), out["feature_vector"], storage)
        _upload_dir(Path(classifier_dir), out["classifier"], storage)
        try:
            example = np.zeros((1, hp.crop, hp.crop, 3), np.float32)
            model_uri = pyfunc.log_final_model(
                tracking_uri, run_id, Path(feature_dir), Path(classifier_dir), example
            )
            registered = config.resolved_registered_model()
            if registered is not None:
                top1 = report.top_k(1) if report is not None else None
                out["version"], decision = promotion.register_and_promote(
                    tracking_uri,
                    run_id,
                    model_uri,
                    registered_model=registered,
                    alias=config.model_alias,
                    policy=config.promote,  # type: ignore[arg-type]
                    val_top1=top1,
                    val_digest=report.digest if report is not None else None,
                )
                out["promoted"] = decision.move
        except Exception as exc:  # the model is safe in config.output; tracking must not lose it
            log.warning(
                "MLflow: could not log/register the final model (%s); it is in %s", exc, out["feature_vector"]
            )
    return out


def _log_evaluation(
    report: evaluation.Evaluation,
    size: int,
    storage: StorageConfig,
    tracking_uri: str,
    run_id: str,
    step: int | None,
) -> None:
    """Evaluation metrics and files to the run (``evaluation/``); a tracking failure only warns."""
    summary = report.summary()
    log.info("evaluation of the exported checkpoint (step %s): %s", step, summary)
    with tempfile.TemporaryDirectory(prefix="bitray-eval-") as tmp:
        evaluation.write_artifacts(report, Path(tmp), size, storage)
        try:
            tracking.log_evaluation(tracking_uri, run_id, summary, Path(tmp), step or 0)
        except Exception as exc:  # noqa: BLE001 - the export matters more than its report
            log.warning("MLflow: could not log the evaluation (%s)", exc)


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
