"""bitray.storage against a real local filesystem and a real S3 HTTP endpoint (moto's server)."""

from __future__ import annotations

import socket

import boto3
import pytest

from bitray import storage
from bitray.config import StorageConfig
from bitray.errors import BitrayError


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def test_local_listing_filters_extensions_and_recurses(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.JPG").write_bytes(b"1")
    (tmp_path / "a" / "notes.txt").write_bytes(b"22")
    (tmp_path / "two.png").write_bytes(b"333")
    listed = list(storage.list_objects(str(tmp_path), extensions=[".jpg", "png"]))
    assert [o.uri for o in listed] == [str(tmp_path / "a" / "one.JPG"), str(tmp_path / "two.png")]
    assert [o.size for o in listed] == [1, 3]
    assert all(o.mtime_ns for o in listed)
    assert listed[0].version == f"size:1:mtime_ns:{listed[0].mtime_ns}"


def test_local_listing_enters_each_directory_once_and_stays_inside_the_root(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"1")
    (root / "sub" / "b.jpg").write_bytes(b"2")
    (tmp_path / "secret.jpg").write_bytes(b"3")  # beside the root, never an input
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.jpg").write_bytes(b"4")
    (root / "again").symlink_to(".")  # a cycle
    (root / "sub" / "loop").symlink_to("..")  # a cycle from below
    (root / "up").symlink_to("..")  # the parent tree
    (root / "out.jpg").symlink_to(tmp_path / "elsewhere")  # a directory outside, named like an image
    (root / "zz").symlink_to("sub")  # a second name of a directory already walked
    listed = [o.uri for o in storage.list_objects(str(root), extensions=[".jpg"])]
    assert listed == [str(root / "a.jpg"), str(root / "sub" / "b.jpg")]
    # a link is followed once when it is the first name of a directory inside the root
    (root / "sub").rename(root / "zsub")
    (root / "zz").unlink()
    (root / "link").symlink_to("zsub")
    listed = [o.uri for o in storage.list_objects(str(root), extensions=[".jpg"])]
    assert listed == [str(root / "a.jpg"), str(root / "link" / "b.jpg")]


def test_local_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(BitrayError, match="does not exist"):
        list(storage.list_objects(str(tmp_path / "nope")))


def test_local_write_is_atomic_and_readable(tmp_path):
    target = tmp_path / "deep" / "out.bin"
    storage.write_bytes(str(target), b"payload")
    assert storage.read_bytes(str(target)) == b"payload"
    assert [p.name for p in target.parent.iterdir()] == ["out.bin"]  # no temp file left behind


def test_s3_listing_pages_etags_prefix_and_markers(s3_server, s3_bucket):
    client = _client(s3_server)
    keys = [f"imgs/{i:04d}.jpg" for i in range(1105)]  # more than one page of 1,000
    for key in keys:
        client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    client.put_object(Bucket=s3_bucket, Key="imgs/", Body=b"")  # directory marker
    client.put_object(Bucket=s3_bucket, Key="imgsX/other.jpg", Body=b"x")  # shares the string prefix
    client.put_object(Bucket=s3_bucket, Key="imgs/ünï cödé 写真.jpg", Body=b"u")

    listed = list(storage.list_objects(f"s3://{s3_bucket}/imgs", extensions=[".jpg"]))
    uris = [o.uri for o in listed]
    assert len(uris) == len(set(uris)) == 1106
    assert f"s3://{s3_bucket}/imgsX/other.jpg" not in uris
    assert f"s3://{s3_bucket}/imgs/" not in uris
    assert f"s3://{s3_bucket}/imgs/ünï cödé 写真.jpg" in uris
    head = client.head_object(Bucket=s3_bucket, Key="imgs/0000.jpg")
    first = next(o for o in listed if o.uri.endswith("/0000.jpg"))
    assert first.etag == head["ETag"].strip('"')
    assert first.version.startswith("etag:")


def test_s3_read_write_roundtrip_through_pyarrow(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/dir/obj.bin"
    storage.write_bytes(uri, b"hello")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"hello"
    assert _client(s3_server).get_object(Bucket=s3_bucket, Key="dir/obj.bin")["Body"].read() == b"hello"


def test_s3_copy_to_local_caches_files_and_directories(s3_server, s3_bucket, tmp_path):
    client = _client(s3_server)
    client.put_object(Bucket=s3_bucket, Key="model/saved_model.pb", Body=b"pb")
    client.put_object(Bucket=s3_bucket, Key="model/variables/variables.index", Body=b"idx")
    local = storage.copy_to_local(f"s3://{s3_bucket}/model", cache_dir=tmp_path)
    assert (local / "saved_model.pb").read_bytes() == b"pb"
    assert (local / "variables" / "variables.index").read_bytes() == b"idx"
    again = storage.copy_to_local(f"s3://{s3_bucket}/model", cache_dir=tmp_path)
    assert again == local


def test_s3_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(BitrayError, match="bucket 'no-such-bucket' .* does not exist"):
        list(storage.list_objects("s3://no-such-bucket/prefix"))


def test_s3_unreachable_endpoint_is_a_clear_error():
    with socket.socket() as sock:  # a loopback port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = StorageConfig(s3_endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(BitrayError, match="cannot reach the S3 endpoint"):
        list(storage.list_objects("s3://bucket/prefix", storage=config))


def test_endpoint_comes_from_config_then_standard_env(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
    assert StorageConfig().resolved_s3_endpoint() == "http://general:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:2")
    assert StorageConfig().resolved_s3_endpoint() == "http://s3only:2"
    assert StorageConfig(s3_endpoint="http://explicit:3").resolved_s3_endpoint() == "http://explicit:3"


def test_unsupported_scheme_and_bucketless_uri():
    with pytest.raises(BitrayError, match="unsupported storage scheme"):
        storage.scheme_of("ftp://host/x")
    with pytest.raises(BitrayError, match="names no bucket"):
        storage.split_bucket("s3:///key")


def test_read_at_most_never_holds_more_than_the_cap(s3_server, s3_bucket, tmp_path):
    client = _client(s3_server)
    client.put_object(Bucket=s3_bucket, Key="ten", Body=b"0123456789")
    client.put_object(Bucket=s3_bucket, Key="empty", Body=b"")
    (tmp_path / "ten").write_bytes(b"0123456789")
    for uri in (f"s3://{s3_bucket}/ten", str(tmp_path / "ten")):
        assert storage.read_at_most(uri, 10) == b"0123456789"
        with pytest.raises(storage.ObjectTooLarge, match="over the cap of 9 bytes"):
            storage.read_at_most(uri, 9)
    assert storage.read_at_most(f"s3://{s3_bucket}/empty", 10) == b""
    with pytest.raises(storage.ObjectMissing):
        storage.read_at_most(f"s3://{s3_bucket}/nope", 10)
    with pytest.raises(storage.ReadRefused, match="not a regular file"):
        storage.read_at_most("/dev/zero", 10)
