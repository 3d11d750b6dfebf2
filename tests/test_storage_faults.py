"""``storage.read_object``: transient faults heal, permanent ones are typed, through a real faulty proxy.

The proxy (tests/fault_proxy.py) sits on loopback in front of moto's S3 server and answers a fraction of
the GETs with 503 SlowDown, 500, a reset connection, a body cut in half, or a delay.
"""

from __future__ import annotations

import os
import time

import boto3
import pytest

from bitray import storage
from bitray.config import StorageConfig
from bitray.storage import (
    ObjectChanged,
    ObjectInfo,
    ObjectMissing,
    ObjectTooLarge,
    PermanentReadError,
    ReadRefused,
    TransientStorageError,
)

pytest_plugins = ["fault_proxy"]


def _seed(endpoint: str, bucket: str, count: int) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    contents = {}
    for i in range(count):
        key = f"img/{i:03d}.jpg"
        contents[key] = os.urandom(1000 + 997 * i)
        client.put_object(Bucket=bucket, Key=key, Body=contents[key])
    return contents


def _listed(endpoint: str, bucket: str) -> list[ObjectInfo]:
    return list(storage.list_objects(f"s3://{bucket}/img/", storage=StorageConfig(s3_endpoint=endpoint)))


def test_every_object_is_read_exactly_through_transient_faults(s3_server, s3_bucket, fault_proxy):
    contents = _seed(s3_server, s3_bucket, 30)
    listed = _listed(s3_server, s3_bucket)
    fault_proxy.set_faults(
        rate=0.4, kinds=("503", "500", "reset", "truncate", "delay"), delay_s=0.05, methods=("GET",)
    )
    config = StorageConfig(s3_endpoint=fault_proxy.url)
    for obj in listed:
        assert storage.read_object(obj, config, retry_for_s=30) == contents[obj.uri.split("/", 3)[3]]
    assert set(fault_proxy.injected) == {"503", "500", "reset", "truncate", "delay"}
    assert sum(fault_proxy.injected.values()) >= 10


@pytest.mark.parametrize("kind", ["503", "500", "expired", "reset", "truncate"])
def test_persistent_faults_end_in_a_transient_error(s3_server, s3_bucket, fault_proxy, kind):
    _seed(s3_server, s3_bucket, 1)
    (obj,) = _listed(s3_server, s3_bucket)
    fault_proxy.set_faults(rate=1.0, kinds=(kind,))
    started = time.monotonic()
    with pytest.raises(TransientStorageError, match="kept failing .* run again with the same run id") as err:
        storage.read_object(obj, StorageConfig(s3_endpoint=fault_proxy.url), retry_for_s=1.0)
    assert ("credentials expired" in str(err.value)) == (kind == "expired")
    assert time.monotonic() - started < 5
    assert fault_proxy.injected[kind] >= 2  # retried, not given up at the first fault


def test_permanent_failures_are_typed_and_not_retried(s3_server, s3_bucket, fault_proxy):
    _seed(s3_server, s3_bucket, 3)
    changed, missing, refused = _listed(s3_server, s3_bucket)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="img/000.jpg", Body=b"new content")  # 412 on If-Match
    client.delete_object(Bucket=s3_bucket, Key="img/001.jpg")  # 404 after listing
    fault_proxy.fail_next("403", match=lambda method, path: path.endswith("/img/002.jpg"))
    config = StorageConfig(s3_endpoint=fault_proxy.url)
    with pytest.raises(ObjectChanged, match="changed after it was listed"):
        storage.read_object(changed, config, retry_for_s=30)
    with pytest.raises(ObjectMissing, match="no longer exists"):
        storage.read_object(missing, config, retry_for_s=30)
    with pytest.raises(ReadRefused, match="refused .*AccessDenied"):
        storage.read_object(refused, config, retry_for_s=30)
    assert fault_proxy.seen["GET"] == 3  # one request each: permanent errors are not retried


def test_too_large_is_decided_from_the_listing_without_a_get(s3_server, s3_bucket, fault_proxy):
    _seed(s3_server, s3_bucket, 2)
    small, large = _listed(s3_server, s3_bucket)
    config = StorageConfig(s3_endpoint=fault_proxy.url)
    with pytest.raises(ObjectTooLarge, match="over the cap of 1,500"):
        storage.read_object(large, config, max_bytes=1500)
    assert fault_proxy.seen["GET"] == 0
    assert len(storage.read_object(small, config, max_bytes=1500)) == small.size
    assert issubclass(ObjectTooLarge, PermanentReadError)


def test_local_reads_check_the_listed_version(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"12345")
    (obj,) = storage.list_objects(str(tmp_path))
    config = StorageConfig()
    assert storage.read_object(obj, config) == b"12345"
    with pytest.raises(ObjectTooLarge):
        storage.read_object(obj, config, max_bytes=4)
    path.write_bytes(b"123456")
    with pytest.raises(ObjectChanged):
        storage.read_object(obj, config)
    path.unlink()
    with pytest.raises(ObjectMissing):
        storage.read_object(obj, config)


def test_error_codes_are_read_in_one_place():
    from botocore.exceptions import ClientError, ReadTimeoutError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
        )

    assert storage.error_code(client_error("SlowDown", 503)) == "SlowDown"
    assert storage.error_code(ValueError("x")) == ""
    for code, status in [("SlowDown", 503), ("InternalError", 500), ("ExpiredToken", 400), ("X", 502)]:
        assert storage.is_transient(client_error(code, status)), code
    assert storage.is_transient(ReadTimeoutError(endpoint_url="http://x"))
    for code, status in [("AccessDenied", 403), ("NoSuchKey", 404), ("PreconditionFailed", 412)]:
        assert not storage.is_transient(client_error(code, status)), code
        assert storage.read_error("s3://b/k", client_error(code, status)) is not None
