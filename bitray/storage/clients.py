"""Clients of the stores: pyarrow filesystems (``filesystem_for``), boto3 S3 clients, the GCS client.

Credentials come from the standard AWS and Google chains and are never printed.
"""

from __future__ import annotations

import functools
import hashlib
import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.storage.uri import local_path, scheme_of, split_bucket


def filesystem_for(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path to use with it (``bucket/key`` or a local path)."""
    storage = storage or StorageConfig()
    scheme = scheme_of(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), str(local_path(uri))
    bucket, key = split_bucket(uri)
    path = f"{bucket}/{key}".rstrip("/")
    if scheme == "s3":
        return s3_filesystem(storage), path
    return pafs.GcsFileSystem(anonymous=storage.anonymous), path


CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    """A shared S3 filesystem per endpoint, region and credential environment.

    Creating one costs tens of milliseconds, far more than reading a small image, so per-object reads
    reuse it. The key includes a digest of the credential variables, so changed credentials get a new one.
    """
    environment = "\0".join(os.environ.get(k, "") for k in CREDENTIAL_ENV)
    credentials = hashlib.sha256(environment.encode()).hexdigest()
    return _s3_filesystem(
        storage.resolved_s3_endpoint(), storage.resolved_s3_region(), storage.anonymous, credentials
    )


@functools.lru_cache(maxsize=32)
def _s3_filesystem(
    endpoint: str | None, region: str, anonymous: bool, _credentials: str
) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": region,
        "anonymous": anonymous,
        "connect_timeout": 5,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc + parsed.path if parsed.scheme else endpoint
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def s3_client(  # noqa: ANN201 - boto3 clients are untyped
    storage: StorageConfig | None = None, *, timeout_s: float | None = None, max_attempts: int = 4
):
    """A boto3 S3 client using the same endpoint and region as ``s3_filesystem``.

    ``timeout_s`` bounds the connect and the read timeouts (default 5 s and 60 s); ``max_attempts``
    counts botocore's tries in all (1: no retries, the caller retries).
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    storage = storage or StorageConfig()
    config = Config(
        connect_timeout=min(5.0, timeout_s) if timeout_s else 5,
        read_timeout=timeout_s or 60,
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        signature_version=UNSIGNED if storage.anonymous else None,
    )
    return boto3.client(
        "s3",
        endpoint_url=storage.resolved_s3_endpoint(),
        region_name=storage.resolved_s3_region(),
        config=config,
    )


def shared_s3_client(storage: StorageConfig, *, retries: bool = True):  # noqa: ANN201
    """A boto3 client shared per endpoint, region and credential environment (creating one costs tens of
    ms). ``retries=False``: botocore does not retry, for callers that decide retries themselves, like
    ``read_object``."""
    environment = "\0".join(os.environ.get(k, "") for k in CREDENTIAL_ENV)
    return _cached_s3_client(
        storage.resolved_s3_endpoint(),
        storage.resolved_s3_region(),
        storage.anonymous,
        hashlib.sha256(environment.encode()).hexdigest(),
        retries,
    )


@functools.lru_cache(maxsize=16)
def _cached_s3_client(endpoint: str | None, region: str, anonymous: bool, _credentials: str, retries: bool):  # noqa: ANN202
    config = StorageConfig(s3_endpoint=endpoint, s3_region=region, anonymous=anonymous)
    if retries:
        return s3_client(config)
    return s3_client(config, timeout_s=30.0, max_attempts=1)


def gcs_client(storage: StorageConfig | None = None):  # noqa: ANN201
    """A google-cloud-storage client (``pip install google-cloud-storage``); honours
    ``STORAGE_EMULATOR_HOST`` for tests. ``storage.anonymous`` gives an anonymous client."""
    try:
        from google.cloud import storage as gcs
    except ImportError:
        raise BitrayError(
            "gs:// needs google-cloud-storage for listing and leases: pip install google-cloud-storage"
        ) from None
    storage = storage or StorageConfig()
    if storage.anonymous or os.environ.get("STORAGE_EMULATOR_HOST"):
        client = gcs.Client.create_anonymous_client()
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            client.project = "bitray-test"
    else:
        client = gcs.Client()
    return client
