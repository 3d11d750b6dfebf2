"""MLflow for fine-tuning: one run per fine-tune, metrics from rank 0, the final model in the registry.

A run's identity is (experiment, name, storage path): it is found again by its ``bitray.run_name`` tag,
so a resumed fine-tune (after a worker failure or a rerun with the same name and storage path) logs into
the same MLflow run, and its step axis continues: ``MetricLogger`` skips steps the run already holds. The
same name with another storage path would be a different Ray Train run (it starts from scratch), so it
is refused rather than merged into the old MLflow run.

Tracking must never stop or stall training: ``MetricLogger`` hands metrics to a background thread
through a bounded queue (a full queue drops the oldest entry, counted), so an unreachable server costs
the training loop a queue insertion per step, and a warning a minute.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bitray.errors import BitrayError
from bitray.redaction import redacted

log = logging.getLogger(__name__)

RUN_NAME_TAG = "bitray.run_name"
STORAGE_PATH_TAG = "bitray.storage_path"
VAL_TOP1_TAG = "bitray.val_top1"
VAL_DIGEST_TAG = "bitray.val_digest"
QUEUE_SIZE = 1000
CLOSE_TIMEOUT_S = 30.0
LOSS_METRIC = "train/loss"
FEATURE_VECTOR = "feature_vector"
CLASSIFIER = "classifier"
MODELS_SCHEME = "models:/"


def _client(tracking_uri: str):  # noqa: ANN202 - mlflow's client type
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def quick_failures() -> None:
    """Fail fast on an unreachable HTTP server (MLflow's default retries take minutes); user values win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def ensure_experiment(client, name: str) -> str:  # noqa: ANN001 - mlflow's client type
    """The id of experiment ``name``, created if missing.

    With a local sqlite store, artifacts go to ``mlartifacts/`` beside the database file rather than to
    MLflow's default ``./mlruns`` of whichever process happens to create the experiment.
    """
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    uri = client.tracking_uri
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        location = (Path(uri.removeprefix("sqlite:///")).absolute().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_or_resume_run(
    tracking_uri: str, experiment: str, run_name: str, storage_path: str
) -> tuple[str, bool]:
    """``(run_id, resumed)``: the run of (``experiment``, ``run_name``, ``storage_path``), or a new one.

    Raises ``BitrayError`` if the name is taken by a run with another storage path (resuming it would
    merge two trainings into one history), or if the tracking server cannot be reached at the start: a
    fine-tune whose tracking is broken from the outset is better stopped before it spends GPU hours.
    """
    quick_failures()
    try:
        client = _client(tracking_uri)
        exp_id = ensure_experiment(client, experiment)
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
        )
    except Exception as exc:  # mlflow raises many types: connection, REST, sqlalchemy
        raise _unusable(tracking_uri, exc) from None
    if found:
        run = found[0]
        earlier = run.data.tags.get(STORAGE_PATH_TAG)
        if earlier is not None and earlier != storage_path:
            raise BitrayError(
                f"run name {run_name!r} is taken in MLflow experiment {experiment!r} (run {run.info.run_id}) "
                f"by a fine-tune with storage_path {earlier!r}, not {storage_path!r}; pass that storage_path "
                "to resume it, or another --name for a new run"
            )
    try:
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return run_id, True
        tags = {RUN_NAME_TAG: run_name, STORAGE_PATH_TAG: storage_path}
        return client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id, False
    except Exception as exc:
        raise _unusable(tracking_uri, exc) from None


def _unusable(tracking_uri: str, exc: Exception) -> BitrayError:
    return BitrayError(f"MLflow tracking at {redacted(tracking_uri)!r} is not usable: {redacted(exc)}")


class MetricLogger:
    """Rank 0's view of the run: metrics and tags that never raise and never wait on the server.

    ``log_metrics`` and ``set_tag`` only enqueue (bounded; when full the oldest entry is dropped and
    counted); a daemon thread sends them. Steps at or below the last step already in the run are
    skipped, so replaying steps after a resume from an older checkpoint does not write a second history
    over the first. ``close`` waits at most ``close_timeout`` seconds for the queue to drain.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        system_metrics: bool = True,
        queue_size: int = QUEUE_SIZE,
        close_timeout: float = CLOSE_TIMEOUT_S,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.last_logged = -1
        self.dropped = 0
        self.close_timeout = close_timeout
        self._warned_at = 0.0
        self._active = False
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        quick_failures()
        self._client = _client(tracking_uri)
        with self._guard("resume the run"):
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            history = self._client.get_metric_history(run_id, LOSS_METRIC)
            self.last_logged = max((m.step for m in history), default=-1)
            mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics and _has_psutil())
            self._active = True
        self._thread = threading.Thread(target=self._send_all, name="bitray-mlflow-logger", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # tracking must never end training
            now = time.monotonic()
            if now - self._warned_at > 60:  # one warning a minute while the server is away
                log.warning("MLflow: could not %s (%s); training goes on", what, redacted(exc))
                self._warned_at = now

    def _put(self, item: tuple) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
                    self._queue.task_done()
                    self.dropped += 1

    def _send_all(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item[0] == "stop":
                    return
                if item[0] == "metrics":
                    _, metrics, step = item
                    with self._guard(f"log metrics at step {step}"):
                        self._client.log_batch(self.run_id, metrics=_metrics(metrics, step))
                else:
                    _, key, value = item
                    with self._guard(f"set tag {key}"):
                        self._client.set_tag(self.run_id, key, value)
            finally:
                self._queue.task_done()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if step <= self.last_logged:
            return
        self.last_logged = step
        self._put(("metrics", dict(metrics), step))

    def set_tag(self, key: str, value: str) -> None:
        self._put(("tag", key, value))

    def close(self) -> None:
        """Send what is queued (waiting ``close_timeout`` seconds at most), then end the run."""
        self._put(("stop",))
        self._thread.join(self.close_timeout)
        if self._thread.is_alive():
            log.warning(
                "MLflow: %d queued entries not sent after %.0f s; giving up",
                self._queue.qsize(),
                self.close_timeout,
            )
        if self.dropped:
            log.warning(
                "MLflow: dropped %d metric/tag entries while the server was slow or away", self.dropped
            )
        if self._active and not self._thread.is_alive():
            with self._guard("end the run"):
                import mlflow

                mlflow.end_run()


def _metrics(values: Mapping[str, float], step: int) -> list:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(key, float(value), stamp, step) for key, value in values.items()]


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params once; a resumed run already has them (MLflow refuses changed values, so skip those)."""
    from mlflow.entities import Param

    client = _client(tracking_uri)
    existing = client.get_run(run_id).data.params
    fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != str(v)[:6000])
    if changed:
        log.warning("resumed MLflow run %s keeps its first values of %s", run_id, ", ".join(changed))
    for start in range(0, len(fresh), 100):
        client.log_batch(run_id, params=fresh[start : start + 100])


def log_final_model(
    tracking_uri: str,
    run_id: str,
    feature_dir: Path,
    classifier_dir: Path,
    example: Any,
) -> str:
    """Log both SavedModels as one pyfunc model in the run, with a signature and ``example`` (float32
    images ``[b, h, w, 3]`` in [0, 1]) as its input example; returns the model URI."""
    import mlflow
    import mlflow.pyfunc

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=BitClassifier(),
            artifacts={FEATURE_VECTOR: str(feature_dir), CLASSIFIER: str(classifier_dir)},
            pip_requirements=["bitray", "tensorflow", "tensorflow-hub", "tf-keras"],
            signature=classifier_signature(),
            input_example=example,
        )
    return info.model_uri


def register_version(tracking_uri: str, model_uri: str, name: str, tags: Mapping[str, str]) -> str:
    """Register ``model_uri`` as a new version of ``name`` with ``tags``; returns the version."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    version = str(mlflow.register_model(model_uri, name).version)
    client = _client(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return version


def alias_holder(tracking_uri: str, name: str, alias: str) -> tuple[str, dict[str, str]] | None:
    """``(version, tags)`` of the version ``name@alias`` points at, or ``None``."""
    from mlflow.exceptions import MlflowException

    try:
        held = _client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException:  # no such alias (or no such model) yet
        return None
    return str(held.version), dict(held.tags)


def registered_version(uri: str) -> str:
    """``models:/NAME@ALIAS`` as ``models:/NAME/<version>``, the version the alias points at now, asked of
    MLflow's own tracking URI (``MLFLOW_TRACKING_URI``), as ``resolve_registered_model`` loads it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name, _, alias = uri.removeprefix(MODELS_SCHEME).rpartition("@")
    if not uri.startswith(MODELS_SCHEME) or not name or not alias:
        raise BitrayError(f"{uri!r} is not a registered model alias; write models:/<name>@<alias>")
    quick_failures()
    try:
        held = _client(mlflow.get_tracking_uri()).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise BitrayError(
            f"cannot resolve {uri!r} in MLflow ({exc.message}); check MLFLOW_TRACKING_URI and the name/alias"
        ) from None
    except Exception as exc:  # connection errors, sqlalchemy
        raise BitrayError(f"cannot resolve {uri!r} in MLflow ({exc}); check MLFLOW_TRACKING_URI") from None
    return f"{MODELS_SCHEME}{name}/{held.version}"


def set_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    _client(tracking_uri).set_registered_model_alias(name, alias, version)


def log_evaluation(
    tracking_uri: str, run_id: str, summary: Mapping[str, float], directory: Path, step: int
) -> None:
    """The evaluation's figures as metrics at ``step`` and its files under ``evaluation/``."""
    client = _client(tracking_uri)
    client.log_batch(run_id, metrics=_metrics(summary, step))
    client.log_artifacts(run_id, str(directory), "evaluation")


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    _client(tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(tracking_uri).set_terminated(run_id, status=status)


def resolve_registered_model(uri: str, part: str = FEATURE_VECTOR, dst: Path | None = None) -> Path:
    """A local SavedModel dir for ``models:/<name>@<alias>`` (or ``models:/<name>/<version>``).

    ``part`` is ``feature_vector`` (for embedding) or ``classifier``. The tracking URI is MLflow's own
    (``MLFLOW_TRACKING_URI``). This is what ``load_model`` calls for ``models:/`` specs.
    """
    import mlflow.artifacts
    import yaml

    if not uri.startswith(MODELS_SCHEME):
        raise BitrayError(f"{uri!r} is not a registered model URI; write models:/<name>@<alias>")
    try:
        fetched = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None)
        local = Path(fetched)
    except Exception as exc:
        raise BitrayError(
            f"cannot fetch {uri!r} from MLflow ({redacted(exc)}); check MLFLOW_TRACKING_URI and the "
            "name/alias"
        ) from None
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if part not in artifacts:
        raise BitrayError(f"{uri!r} is not a bitray fine-tuned model (no {part!r} artifact)")
    return local / artifacts[part]["path"]


try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    PythonModel = object  # type: ignore[misc,assignment]


TOP_K = 5


def classifier_signature():  # noqa: ANN201 - mlflow.models.ModelSignature
    """Images in, per image the best label and score plus the top-k labels and probabilities out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, 3))]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("double", "score"),
                ColSpec(Array("string"), "top_k_labels"),
                ColSpec(Array("double"), "top_k_scores"),
            ]
        ),
        params=ParamSchema([ParamSpec("top_k", "long", TOP_K)]),
    )


class BitClassifier(PythonModel):
    """pyfunc face of a fine-tuned model: float32 images ``[b, h, w, 3]`` in [0, 1] -> per image, ``label``
    and ``score`` (the most probable class and its softmax probability) and the ``top_k`` (param,
    default 5) ``top_k_labels`` with their ``top_k_scores``. Class names come from the classifier
    SavedModel's ``labels.txt`` (``class_<i>`` when it has none)."""

    def load_context(self, context) -> None:  # noqa: ANN001 - mlflow's context type
        import tensorflow as tf  # bitray (imported with this module) selected Keras 2 already

        from bitray.model.weights import read_class_names

        directory = Path(context.artifacts[CLASSIFIER])
        self._model = tf.saved_model.load(str(directory))
        self._classes = read_class_names(directory)

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        import numpy as np
        import pandas as pd
        import tensorflow as tf

        logits = self._model(tf.constant(np.asarray(model_input, np.float32))).numpy()
        probabilities = tf.nn.softmax(logits, axis=-1).numpy()
        classes = self._classes or [f"class_{i}" for i in range(logits.shape[1])]
        k = min(int((params or {}).get("top_k", TOP_K)), logits.shape[1])
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return pd.DataFrame(
            {
                "label": [classes[row[0]] for row in order],
                "score": [float(p[row[0]]) for p, row in zip(probabilities, order, strict=True)],
                "top_k_labels": [[classes[i] for i in row] for row in order],
                "top_k_scores": [
                    [float(p[i]) for i in row] for p, row in zip(probabilities, order, strict=True)
                ],
            }
        )
