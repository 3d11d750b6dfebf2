"""MLflow for fine-tuning: one run per fine-tune, metrics from rank 0, the final model in the registry.

The run is found again by its ``bitray.run_name`` tag, so a resumed fine-tune (after a worker failure or a
rerun with the same name) logs into the same MLflow run, and its step axis continues: ``MetricLogger``
skips steps the run already holds. Tracking must never stop training: every call is wrapped, and an
unreachable server costs a warning, not the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bitray.errors import BitrayError

log = logging.getLogger(__name__)

RUN_NAME_TAG = "bitray.run_name"
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


def start_or_resume_run(tracking_uri: str, experiment: str, run_name: str) -> tuple[str, bool]:
    """``(run_id, resumed)``: the run tagged with ``run_name`` in ``experiment``, or a new one.

    Raises ``BitrayError`` if the tracking server cannot be reached at the start: a fine-tune whose
    tracking is broken from the outset is better stopped before it spends GPU hours.
    """
    quick_failures()
    try:
        client = _client(tracking_uri)
        exp_id = ensure_experiment(client, experiment)
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return run_id, True
        run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
        return run.info.run_id, False
    except Exception as exc:  # mlflow raises many types: connection, REST, sqlalchemy
        raise BitrayError(f"MLflow tracking at {tracking_uri!r} is not usable: {exc}") from None


class MetricLogger:
    """Rank 0's view of the run: metrics and tags that warn instead of raising.

    Steps at or below the last step already in the run are skipped, so replaying steps after a resume
    from an older checkpoint does not write a second history over the first.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, system_metrics: bool = True) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.last_logged = -1
        self._warned_at = 0.0
        self._active = False
        quick_failures()
        self._client = _client(tracking_uri)
        with self._guard("resume the run"):
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            history = self._client.get_metric_history(run_id, LOSS_METRIC)
            self.last_logged = max((m.step for m in history), default=-1)
            mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics and _has_psutil())
            self._active = True

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # tracking must never end training
            now = time.monotonic()
            if now - self._warned_at > 60:  # one warning a minute while the server is away
                log.warning("MLflow: could not %s (%s); training goes on", what, exc)
                self._warned_at = now

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if step <= self.last_logged:
            return
        with self._guard(f"log metrics at step {step}"):
            self._client.log_batch(self.run_id, metrics=_metrics(metrics, step))
            self.last_logged = step

    def set_tag(self, key: str, value: str) -> None:
        with self._guard(f"set tag {key}"):
            self._client.set_tag(self.run_id, key, value)

    def close(self) -> None:
        if self._active:
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
    *,
    registered_model: str | None,
    alias: str,
) -> str | None:
    """Log both SavedModels as one pyfunc model in the run; register it and point ``alias`` at it.

    Returns the registered version (``None`` when ``registered_model`` is ``None``).
    """
    import mlflow
    import mlflow.pyfunc

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=BitClassifier(),
            artifacts={FEATURE_VECTOR: str(feature_dir), CLASSIFIER: str(classifier_dir)},
            pip_requirements=["bitray", "tensorflow", "tensorflow-hub", "tf-keras"],
        )
        if registered_model is None:
            return None
        version = mlflow.register_model(info.model_uri, registered_model)
        _client(tracking_uri).set_registered_model_alias(registered_model, alias, version.version)
        mlflow.set_tag("bitray.registered_model", f"{MODELS_SCHEME}{registered_model}@{alias}")
        return str(version.version)


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
            f"cannot fetch {uri!r} from MLflow ({exc}); check MLFLOW_TRACKING_URI and the name/alias"
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


class BitClassifier(PythonModel):
    """pyfunc face of a fine-tuned model: float images [b, h, w, 3] in [0, 1] -> class logits."""

    def load_context(self, context) -> None:  # noqa: ANN001 - mlflow's context type
        import tensorflow as tf  # bitray (imported with this module) selected Keras 2 already

        self._model = tf.saved_model.load(context.artifacts[CLASSIFIER])

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        import numpy as np
        import tensorflow as tf

        return self._model(tf.constant(np.asarray(model_input, np.float32))).numpy()
