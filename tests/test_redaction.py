"""Passwords in URIs never reach what bitray prints: MLflow tracking URIs and S3 endpoints carry them in
their user info (``http://user:password@host``), signed URLs in their query."""

from __future__ import annotations

import logging
import socket

import pytest

from bitray import storage, tracking
from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.redaction import redacted

SECRET = "hunter2"


def _closed_port() -> int:
    with socket.socket() as sock:  # a loopback port with nothing listening
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def uri(monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    return f"http://ci:{SECRET}@127.0.0.1:{_closed_port()}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://me:hunter2@mlflow:5000", "http://me:***@mlflow:5000"),
        (
            "at 'postgresql://u:p%40ss@db:5432/ml?sslmode=require' now",
            "at 'postgresql://u:***@db:5432/ml?sslmode=require' now",
        ),
        ("https://h/x.jpg?X-Amz-Signature=abc&v=1", "https://h/x.jpg?X-Amz-Signature=***&v=1"),
        ("https://mlflow/?token=abc", "https://mlflow/?token=***"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("s3://bucket/what?token=1.jpg", "s3://bucket/what?token=1.jpg"),  # ? is part of an S3 key
        ("http://minio:9000", "http://minio:9000"),
    ],
)
def test_redacted_masks_only_the_secrets(text, expected):
    assert redacted(text) == expected


def test_tracking_errors_and_warnings_do_not_print_the_password(uri, caplog):
    with pytest.raises(BitrayError, match="not usable") as raised:
        tracking.start_or_resume_run(uri, "exp", "x", "/runs")
    assert SECRET not in str(raised.value) and "ci:***@127.0.0.1" in str(raised.value)
    with caplog.at_level(logging.WARNING):
        logger = tracking.MetricLogger(uri, "0" * 32, system_metrics=False)
        logger.log_metrics({"train/loss": 1.0}, 1)
        logger.close()
    assert "training goes on" in caplog.text and SECRET not in caplog.text


def test_evaluate_warns_and_prints_without_the_password(uri, caplog, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    from bitray.cli import main
    from bitray.search import evaluate

    result = evaluate.Evaluation("out", "bit-tiny@random-init", 10, 2, 0, 5, {"knn/top1_k1": 0.5})
    with caplog.at_level(logging.WARNING):
        assert evaluate.log_to_mlflow(result, None, 0.01, "labels.csv", uri) is None
    assert "could not log the evaluation" in caplog.text and SECRET not in caplog.text

    # the command's own line once logging worked (the evaluation itself is tested in test_search_evaluate)
    monkeypatch.setattr(evaluate, "evaluate", lambda *args, **kwargs: result)
    monkeypatch.setattr(evaluate, "log_to_mlflow", lambda *args, **kwargs: "0" * 32)
    assert main(["evaluate", "--embeddings", "out", "--labels", "l.csv", "--tracking-uri", uri]) == 0
    printed = capsys.readouterr()
    assert "logged to MLflow run" in printed.err and SECRET not in printed.err + printed.out


def test_an_unreachable_s3_endpoint_is_named_without_its_password():
    config = StorageConfig(s3_endpoint=f"http://key:{SECRET}@127.0.0.1:{_closed_port()}")
    with pytest.raises(BitrayError, match="cannot reach the S3 endpoint") as raised:
        list(storage.list_objects("s3://bucket/prefix", storage=config))
    assert SECRET not in str(raised.value) and "key:***@127.0.0.1" in str(raised.value)


def test_a_ray_job_server_address_is_named_without_its_password(capsys):
    from bitray.cli import main

    assert main(["jobs", "list", "--address", f"http://ops:{SECRET}@127.0.0.1:{_closed_port()}"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Ray job server at http://ops:***@127.0.0.1:" in err and SECRET not in err
