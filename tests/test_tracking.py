"""MLflow tracking for fine-tunes: run resumption by name, continuous step axis, surviving a dead server."""

from __future__ import annotations

import logging
import os

import pytest

from bitray import tracking
from bitray.errors import BitrayError
from bitray.model import registry

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing answers


@pytest.fixture(autouse=True)
def _fast_http_failures(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def test_same_run_name_resumes_the_same_run(mlflow_tracking_uri):
    run_id, resumed = tracking.start_or_resume_run(mlflow_tracking_uri, "exp", "digits-1", "/runs")
    assert not resumed
    again, resumed = tracking.start_or_resume_run(mlflow_tracking_uri, "exp", "digits-1", "/runs")
    assert (again, resumed) == (run_id, True)
    other, resumed = tracking.start_or_resume_run(mlflow_tracking_uri, "exp", "digits-2", "/runs")
    assert other != run_id and not resumed


def test_same_name_with_another_storage_path_is_refused(mlflow_tracking_uri):
    tracking.start_or_resume_run(mlflow_tracking_uri, "exp", "digits-1", "/runs/a")
    with pytest.raises(BitrayError, match=r"'digits-1' is taken .* storage_path '/runs/a', not '/runs/b'"):
        tracking.start_or_resume_run(mlflow_tracking_uri, "exp", "digits-1", "/runs/b")
    # the same name in another experiment is another run
    assert not tracking.start_or_resume_run(mlflow_tracking_uri, "exp2", "digits-1", "/runs/b")[1]


def test_resumed_logger_continues_the_step_axis(mlflow_tracking_uri):
    from mlflow import MlflowClient

    run_id, _ = tracking.start_or_resume_run(mlflow_tracking_uri, "exp", "resume", "/runs")
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

    run_id, _ = tracking.start_or_resume_run(mlflow_tracking_uri, "exp", "params", "/runs")
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


@pytest.mark.slow
def test_a_stopped_tracking_server_does_not_stall_logging(tmp_path, caplog):
    """A real ``mlflow server``, stopped mid-run: every later step costs the loop a queue insertion."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from mlflow import MlflowClient

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        run_id, _ = tracking.start_or_resume_run(uri, "exp", "stalled", "/runs")
        logger = tracking.MetricLogger(uri, run_id, system_metrics=False, close_timeout=5)
        for step in range(1, 11):
            logger.log_metrics({tracking.LOSS_METRIC: 1.0}, step)
        deadline = time.monotonic() + 30  # the background thread sends them while the server is up
        while len(MlflowClient(uri).get_metric_history(run_id, tracking.LOSS_METRIC)) < 10:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        slowest = 0.0
        with caplog.at_level(logging.WARNING):
            for step in range(11, 2011):  # more steps than the queue holds
                started = time.perf_counter()
                logger.log_metrics({tracking.LOSS_METRIC: 1.0}, step)
                slowest = max(slowest, time.perf_counter() - started)
            started = time.perf_counter()
            logger.close()
            closing = time.perf_counter() - started
        assert slowest < 0.05, slowest
        assert closing < 8, closing  # close waits close_timeout at most
        assert logger.dropped > 0 and "dropped" in caplog.text
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_unreachable_server_at_start_is_a_clear_error():
    with pytest.raises(BitrayError, match="not usable"):
        tracking.start_or_resume_run(UNREACHABLE, "exp", "x", "/runs")


def test_registered_model_uri_must_use_models_scheme():
    with pytest.raises(BitrayError, match="models:/"):
        registry.resolve_registered_model("runs:/abc/model")


def test_a_model_pickled_before_the_registry_moved_still_loads():
    """MLflow pickles a pyfunc's ``python_model`` with cloudpickle, by reference to its class's module:
    models registered before ``bitray.model.pyfunc`` existed name ``bitray.tracking.BitClassifier``."""
    import cloudpickle

    from bitray.model.pyfunc import BitClassifier

    new = cloudpickle.dumps(BitClassifier(), protocol=2)  # protocol 2: the reference is one plain line
    reference = b"cbitray.model.pyfunc\nBitClassifier\n"
    assert new.count(reference) == 1  # by reference, not by value
    old = new.replace(reference, b"cbitray.tracking\nBitClassifier\n")  # as such a model's pickle reads
    assert type(cloudpickle.loads(old)) is BitClassifier
