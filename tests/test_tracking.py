"""MLflow tracking for fine-tunes: run resumption by name, continuous step axis, surviving a dead server."""

from __future__ import annotations

import logging

import pytest

from bitray import tracking
from bitray.errors import BitrayError

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing answers


@pytest.fixture(autouse=True)
def _fast_http_failures(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def test_same_run_name_resumes_the_same_run(mlflow_tracking_uri):
    run_id, resumed = tracking.start_or_resume_run(mlflow_tracking_uri, "exp", "digits-1")
    assert not resumed
    again, resumed = tracking.start_or_resume_run(mlflow_tracking_uri, "exp", "digits-1")
    assert (again, resumed) == (run_id, True)
    other, resumed = tracking.start_or_resume_run(mlflow_tracking_uri, "exp", "digits-2")
    assert other != run_id and not resumed


def test_resumed_logger_continues_the_step_axis(mlflow_tracking_uri):
    from mlflow import MlflowClient

    run_id, _ = tracking.start_or_resume_run(mlflow_tracking_uri, "exp", "resume")
    first = tracking.MetricLogger(mlflow_tracking_uri, run_id, system_metrics=False)
    for step in range(1, 31):
        first.log_metrics({tracking.LOSS_METRIC: 1.0 / step}, step)
    first.close()
    # a worker restarted from the checkpoint at step 20 replays steps 21..30, then goes on
    second = tracking.MetricLogger(mlflow_tracking_uri, run_id, system_metrics=False)
    assert second.last_logged == 30
    for step in range(21, 41):
        second.log_metrics({tracking.LOSS_METRIC: 2.0}, step)
    second.close()
    history = MlflowClient(mlflow_tracking_uri).get_metric_history(run_id, tracking.LOSS_METRIC)
    assert [m.step for m in history] == list(range(1, 41))
    assert {m.value for m in history if m.step <= 30} == {1.0 / s for s in range(1, 31)}


def test_params_of_a_resumed_run_are_kept(mlflow_tracking_uri, caplog):
    from mlflow import MlflowClient

    run_id, _ = tracking.start_or_resume_run(mlflow_tracking_uri, "exp", "params")
    tracking.log_params(mlflow_tracking_uri, run_id, {"base_lr": 0.003, "world_size": 2})
    with caplog.at_level(logging.WARNING):
        tracking.log_params(mlflow_tracking_uri, run_id, {"base_lr": 0.003, "world_size": 4, "new": "x"})
    params = MlflowClient(mlflow_tracking_uri).get_run(run_id).data.params
    assert params == {"base_lr": "0.003", "world_size": "2", "new": "x"}
    assert "world_size" in caplog.text


def test_unreachable_server_warns_and_does_not_raise(caplog):
    with caplog.at_level(logging.WARNING):
        logger = tracking.MetricLogger(UNREACHABLE, "0" * 32, system_metrics=False)
        logger.log_metrics({"train/loss": 1.0}, 1)
        logger.set_tag("k", "v")
        logger.close()
    assert "training goes on" in caplog.text


def test_unreachable_server_at_start_is_a_clear_error():
    with pytest.raises(BitrayError, match="not usable"):
        tracking.start_or_resume_run(UNREACHABLE, "exp", "x")


def test_registered_model_uri_must_use_models_scheme():
    with pytest.raises(BitrayError, match="models:/"):
        tracking.resolve_registered_model("runs:/abc/model")
