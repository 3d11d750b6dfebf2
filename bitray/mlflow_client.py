"""Connecting to MLflow: a client for a tracking URI, fail-fast HTTP settings, experiments by name.

The one place both MLflow users (``bitray.tracking``: runs and metrics; ``bitray.model.registry``: the
model registry) get their client from, so neither imports the other.
"""

from __future__ import annotations

import os
from pathlib import Path


def client(tracking_uri: str):  # noqa: ANN201 - mlflow's client type
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def quick_failures() -> None:
    """Fail fast on an unreachable HTTP server (MLflow's default retries take minutes); user values win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def ensure_experiment(mlflow_client, name: str) -> str:  # noqa: ANN001 - mlflow's client type
    """The id of experiment ``name``, created if missing.

    With a local sqlite store, artifacts go to ``mlartifacts/`` beside the database file rather than to
    MLflow's default ``./mlruns`` of whichever process happens to create the experiment.
    """
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    uri = mlflow_client.tracking_uri
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        location = (Path(uri.removeprefix("sqlite:///")).absolute().parent / "mlartifacts").as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)
