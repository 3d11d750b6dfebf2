"""Keys exactly as stored: URIs are split at the bucket, never parsed as URLs; listing order is S3's.

Every name below is listed, read and written back byte for byte, on moto's S3 and on the local disk.
"""

from __future__ import annotations

import boto3
import pytest

from bitray import storage
from bitray.config import StorageConfig

NAMES = [
    "summer #1.jpg",
    "what?.jpg",
    "x?versionId=3&y#frag.jpg",
    "100%.jpg",
    "q%3F%20.jpg",  # looks percent-encoded; must not be decoded
    "a+b.jpg",
    "two  spaces .jpg",
    "ünï cödé 写真.jpg",
    "emoji 📷.jpg",
    "trailing.",
    "trailing..",
    "semi;colon,comma=eq&amp.jpg",
    "dir.d/inner.jpg",
]
S3_ONLY = ["double//slash.jpg", "/leading-slash.jpg", "ends-in-slash-dir//x.jpg"]


def test_uris_are_split_at_the_bucket_not_parsed():
    assert storage.split_bucket("s3://b/photos/summer #1.jpg") == ("b", "photos/summer #1.jpg")
    assert storage.split_bucket("gs://b/what?.jpg") == ("b", "what?.jpg")
    assert storage.split_bucket("s3://b//lead") == ("b", "/lead")
    assert storage.split_bucket("gcs://b/a%20b") == ("b", "a%20b")
    assert storage.split_bucket("s3://b") == ("b", "")
    assert storage.scheme_of("s3://b/k#x") == "s3"
    assert storage.scheme_of("GCS://b/k") == "gs"
    assert storage.scheme_of("/tmp/a #1?.jpg") == "file"
    assert storage.scheme_of("relative/what?.jpg") == "file"
    assert str(storage.local_path("file:///tmp/a%20b #1.jpg")) == "/tmp/a%20b #1.jpg"
    assert storage.join("s3://b/p/", "x #1.jpg") == "s3://b/p/x #1.jpg"


def test_s3_keys_are_listed_read_and_written_back_exactly(s3_server, s3_bucket):
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = [f"in/{name}" for name in NAMES + S3_ONLY]
    for key in keys:
        client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    config = StorageConfig()

    listed = list(storage.list_objects(f"s3://{s3_bucket}/in/", storage=config))
    assert [o.uri for o in listed] == sorted(f"s3://{s3_bucket}/{key}" for key in keys)
    for obj in listed:
        key = obj.uri[len(f"s3://{s3_bucket}/") :]
        assert storage.read_object(obj, config) == key.encode()
        assert storage.read_bytes(obj.uri, config) == key.encode()
        assert storage.exists(obj.uri, config)
        storage.write_bytes(obj.uri, b"rewritten " + key.encode(), config)
        assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == b"rewritten " + key.encode()
    stored = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert sorted(stored) == sorted(keys)  # written back under the same keys, nothing new
    storage.delete(listed[0].uri, config)
    assert not storage.exists(listed[0].uri, config)


def test_local_names_are_listed_read_and_written_back_exactly(tmp_path):
    root = tmp_path / "in"
    for name in NAMES:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
    listed = list(storage.list_objects(str(root)))
    assert [o.uri for o in listed] == sorted(str(root / name) for name in NAMES)
    for obj in listed:
        name = obj.uri[len(str(root)) + 1 :]
        assert storage.read_object(obj, StorageConfig()) == name.encode()
        assert storage.read_bytes(obj.uri) == name.encode()
        storage.write_bytes(obj.uri, b"again")
        assert (root / name).read_bytes() == b"again"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == sorted(NAMES)


ORDER_NAMES = [
    "a-c.jpg",
    "a/b.jpg",
    "a.jpg",
    "a0.jpg",
    "a b.jpg",
    "ab/x.jpg",
    "a/b/c.jpg",
    "a/b-c.jpg",
    "Z.jpg",
]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_listing_order_is_code_point_order_of_the_uris(where, tmp_path, request):
    if where == "local":
        for name in ORDER_NAMES:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(b"x")
        uri = str(tmp_path)
    else:
        endpoint, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for name in ORDER_NAMES:
            client.put_object(Bucket=bucket, Key=f"p/{name}", Body=b"x")
        uri = f"s3://{bucket}/p"
    uris = [o.uri for o in storage.list_objects(uri)]
    assert len(uris) == len(ORDER_NAMES)
    assert uris == sorted(uris)
    assert uris.index(storage.join(uri, "a-c.jpg")) < uris.index(storage.join(uri, "a/b.jpg"))
