"""MLflow runs for fine-tuning: one run per fine-tune, metrics from rank 0 (the registry and the pyfunc
model are ``bitray.model.registry`` and ``bitray.model.pyfunc``).

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
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bitray.errors import BitrayError
from bitray.mlflow_client import client, ensure_experiment, quick_failures
from bitray.redaction import redacted

log = logging.getLogger(__name__)

RUN_NAME_TAG = "bitray.run_name"
STORAGE_PATH_TAG = "bitray.storage_path"
QUEUE_SIZE = 1000
CLOSE_TIMEOUT_S = 30.0
LOSS_METRIC = "train/loss"


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
        server = client(tracking_uri)
        exp_id = ensure_experiment(server, experiment)
        found = server.search_runs(
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
            server.update_run(run_id, status="RUNNING")
            return run_id, True
        tags = {RUN_NAME_TAG: run_name, STORAGE_PATH_TAG: storage_path}
        return server.create_run(exp_id, run_name=run_name, tags=tags).info.run_id, False
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
        self._client = client(tracking_uri)
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

    server = client(tracking_uri)
    existing = server.get_run(run_id).data.params
    fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    changed = sorted(k for k, v in params.items() if k in existing and existing[k] != str(v)[:6000])
    if changed:
        log.warning("resumed MLflow run %s keeps its first values of %s", run_id, ", ".join(changed))
    for start in range(0, len(fresh), 100):
        server.log_batch(run_id, params=fresh[start : start + 100])


def log_evaluation(
    tracking_uri: str, run_id: str, summary: Mapping[str, float], directory: Path, step: int
) -> None:
    """The evaluation's figures as metrics at ``step`` and its files under ``evaluation/``."""
    server = client(tracking_uri)
    server.log_batch(run_id, metrics=_metrics(summary, step))
    server.log_artifacts(run_id, str(directory), "evaluation")


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client(tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


def __getattr__(name: str) -> Any:
    """Models logged before ``bitray.model.pyfunc`` existed were pickled by MLflow as
    ``bitray.tracking.BitClassifier``: loading them with ``mlflow.pyfunc.load_model`` still works."""
    if name == "BitClassifier":
        from bitray.model.pyfunc import BitClassifier

        return BitClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
