"""``gs://`` through google-cloud-storage against gcp-storage-emulator (a real HTTP server on loopback).

The emulator answers one page whatever the page size and ignores generation preconditions, so here it
shows names, order, reads and the lease's happy path; the atomicity of GCS's conditional writes is
Google's guarantee (``ifGenerationMatch``), exercised on S3 in test_locks.py through the same protocol.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from bitray import storage
from bitray.config import StorageConfig
from bitray.locks import LeaseLock, LockHeld, open_lock
from bitray.storage import ObjectChanged, ObjectMissing, ObjectTooLarge

pytest.importorskip("gcp_storage_emulator")

NAMES = [
    "a-c.jpg",
    "a/b.jpg",
    "a.jpg",
    "a0.jpg",
    "what?.jpg",
    "summer #1.jpg",
    "100%+.jpg",
    "d//s.jpg",
    "ü.jpg",
]


@pytest.fixture(scope="module")
def gcs_emulator() -> Iterator[str]:
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    host = f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    yield host
    server.stop()
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved


@pytest.fixture()
def gcs_bucket(gcs_emulator: str):  # noqa: ANN201 - a google.cloud.storage.Bucket
    import uuid

    return storage.gcs_client().create_bucket(f"test-{uuid.uuid4().hex[:12]}")


def test_gs_listing_streams_in_uri_order_with_keys_as_stored(gcs_bucket):
    for name in NAMES:
        gcs_bucket.blob(f"p/{name}").upload_from_string(name.encode())
    gcs_bucket.blob("p/").upload_from_string(b"")  # a directory marker
    gcs_bucket.blob("pX/other.jpg").upload_from_string(b"x")  # shares the string prefix
    listed = list(storage.list_objects(f"gs://{gcs_bucket.name}/p"))
    uris = [o.uri for o in listed]
    assert uris == sorted(f"gs://{gcs_bucket.name}/p/{name}" for name in NAMES)
    config = StorageConfig()
    for obj in listed:
        assert obj.mtime_ns and obj.size == len(obj.uri.split("/p/", 1)[1].encode())
        assert storage.read_object(obj, config) == obj.uri.split("/p/", 1)[1].encode()


def test_gs_reads_are_typed(gcs_bucket):
    gcs_bucket.blob("p/changed.jpg").upload_from_string(b"1234")
    gcs_bucket.blob("p/gone.jpg").upload_from_string(b"1234")
    changed, gone = storage.list_objects(f"gs://{gcs_bucket.name}/p/")
    gcs_bucket.blob("p/changed.jpg").upload_from_string(b"12345")
    gcs_bucket.blob("p/gone.jpg").delete()
    config = StorageConfig()
    with pytest.raises(ObjectChanged):
        storage.read_object(changed, config)
    with pytest.raises(ObjectMissing):
        storage.read_object(gone, config)
    with pytest.raises(ObjectTooLarge):
        storage.read_object(changed, config, max_bytes=3)


def test_gs_versions_are_generations_so_a_same_size_replacement_is_a_change(gcs_bucket):
    blob = gcs_bucket.blob("p/photo.jpg")
    blob.upload_from_string(b"AAAA")
    (listed,) = storage.list_objects(f"gs://{gcs_bucket.name}/p/")
    blob.reload()
    assert listed.etag == str(blob.generation) and listed.version == f"etag:{blob.generation}"
    assert storage.read_object(listed, StorageConfig()) == b"AAAA"
    blob.upload_from_string(b"BBBB")  # same size, new content: a new generation
    (relisted,) = storage.list_objects(f"gs://{gcs_bucket.name}/p/")
    assert relisted.size == listed.size and relisted.version != listed.version
    with pytest.raises(ObjectChanged, match="generation"):
        storage.read_object(listed, StorageConfig())  # never the new bytes under the old version
    assert storage.read_object(relisted, StorageConfig()) == b"BBBB"


def test_gs_read_at_most_reads_a_range(gcs_bucket):
    gcs_bucket.blob("p/ten").upload_from_string(b"0123456789")
    assert storage.read_at_most(f"gs://{gcs_bucket.name}/p/ten", 10) == b"0123456789"
    with pytest.raises(ObjectTooLarge):
        storage.read_at_most(f"gs://{gcs_bucket.name}/p/ten", 9)
    with pytest.raises(ObjectMissing):
        storage.read_at_most(f"gs://{gcs_bucket.name}/p/nope", 9)


def test_gs_objects_recorded_by_size_and_mtime_stay_unchanged_after_the_upgrade():
    """Outputs recorded GCS objects by size and mtime before generations: the same object is unchanged."""
    from bitray.embed.state import diff

    uri = "gs://bucket/p/a.jpg"
    listed = [storage.ObjectInfo(uri, 4, 1_000, etag="1796505015990195768")]
    assert [s for _, s in diff(listed, [(uri, "size:4:mtime_ns:1000")])] == ["unchanged"]
    assert [s for _, s in diff(listed, [(uri, "size:4:mtime_ns:999")])] == ["changed"]
    local = [storage.ObjectInfo("/p/a.jpg", 4, 1_000, etag="x")]  # only gs:// had no version before
    assert [s for _, s in diff(local, [("/p/a.jpg", "size:4:mtime_ns:1000")])] == ["changed"]


def test_gs_missing_bucket_is_a_clear_error(gcs_emulator):
    with pytest.raises(storage.BitrayError, match="bucket 'no-such-bucket' .* does not exist"):
        list(storage.list_objects("gs://no-such-bucket/p/"))


def test_gs_lease_happy_path(gcs_bucket):
    uri = f"gs://{gcs_bucket.name}/out/_bitray/lock"
    with open_lock(uri, "run-a", storage=StorageConfig(), ttl_s=1.0) as holder:
        assert isinstance(holder, LeaseLock)
        holder.check()
        with pytest.raises(LockHeld, match="run run-a"):
            open_lock(uri, "run-b", storage=StorageConfig(), ttl_s=1.0).acquire()
        assert holder.renew()
        holder.check()
    assert gcs_bucket.get_blob("out/_bitray/lock") is None


def test_gs_listing_streams_instead_of_gathering(monkeypatch):
    """The listing yields the first page's objects before it asks for the second page."""
    from types import SimpleNamespace

    asked: list[int] = []

    def list_blobs(bucket, prefix, page_size):  # noqa: ANN001, ANN202 - stands in for google's pager
        for page in range(3):
            asked.append(page)
            for i in range(page_size):
                yield SimpleNamespace(name=f"{prefix}{page}/{i:04d}.jpg", size=1, updated=None, generation=1)

    fake_client = SimpleNamespace(list_blobs=list_blobs)
    monkeypatch.setattr("bitray.storage.listing.gcs_client", lambda config=None: fake_client)
    listing = storage.list_objects("gs://bucket/p/")
    first = next(listing)
    assert first.uri == "gs://bucket/p/0/0000.jpg" and asked == [0]
    assert sum(1 for _ in listing) == 2999 and asked == [0, 1, 2]
