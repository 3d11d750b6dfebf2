"""Shared fixtures: real local services on 127.0.0.1, started by the tests themselves.

- ``ray_local``: one local Ray instance for the whole test session (importing TensorFlow in each worker
  costs seconds, so workers are reused across tests and modules).
- ``s3_server``: moto's S3 HTTP server on an ephemeral loopback port, with the env vars that point both
  boto3 and bitray at it; ``s3_bucket`` gives a fresh bucket per test.
- ``mlflow_tracking_uri``: an MLflow sqlite store in the test's tmp dir.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

import bitray  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
from bitray.embed.isolation import MODEL_CRASH_COLOUR_ENV
from bitray.embed.sandbox import CRASH_MARKER_ENV

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Ray workers see only the environment Ray was started with: give them the dummy keys the moto server
# accepts even when Ray starts before the s3_server fixture (unsigned uploads would be stored still framed).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray 2.60 turns token auth on for local clusters whenever ~/.ray/auth_token exists; the test clusters
# listen on loopback only, and must behave the same on a fresh machine and on one that has a token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
# Images holding this marker abort the decoder's process (``bitray.embed.sandbox``): how the tests make a
# real image that kills its Ray worker. Set here so that every test Ray worker has it.
CRASH_MARKER = "bitray-test: this image crashes the decoder"
os.environ.setdefault(CRASH_MARKER_ENV, CRASH_MARKER)
# And a model actor aborts on a batch holding an image of exactly this colour (``bitray.embed.isolation``).
CRASH_COLOUR = (7, 77, 177)
os.environ.setdefault(MODEL_CRASH_COLOUR_ENV, ",".join(map(str, CRASH_COLOUR)))


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray instance, started once; tests must not call ``ray.shutdown``."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,  # logical slots: Data tasks, embed actors and 2 Train workers at once
            include_dashboard=False,
            object_store_memory=1_000_000_000,
            log_to_driver=True,
            runtime_env={"env_vars": {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}},
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto) on 127.0.0.1; returns its URL and exports it for boto3 and bitray."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_server: str) -> str:
    """A new, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture()
def mlflow_tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh MLflow sqlite backend with artifacts in the test's tmp dir."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
