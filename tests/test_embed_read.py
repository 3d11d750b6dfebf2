"""The CPU stage on its own: each input becomes pixels or one error record, and only the listed version."""

from __future__ import annotations

import json

import boto3
import numpy as np
import pyarrow as pa
from image_corpus import corpus

from bitray.config import StorageConfig
from bitray.embed import decode_shards
from bitray.storage import list_objects


def run_stage(objects, storage=None) -> tuple[np.ndarray, list[dict], list[dict]]:  # noqa: ANN001
    records = [{"path": o.uri, "etag": o.etag, "size": o.size, "mtime_ns": o.mtime_ns} for o in objects]
    batch = pa.table({"shard": [0], "inputs": [json.dumps(records)]})
    out = decode_shards(batch, storage_config=storage or StorageConfig(), size=(32, 32), max_pixels=None)
    row = out.to_pylist()[0]
    images, errors = json.loads(row["images"]), json.loads(row["errors"])
    pixels = np.frombuffer(row["pixels"], np.float32).reshape(len(images), 32, 32, 3)
    return pixels, images, errors


def test_local_object_changed_after_listing_is_a_read_error(tmp_path):
    photo = corpus()["grey.jpg"].data
    for name in ("same.jpg", "changed.jpg"):
        (tmp_path / name).write_bytes(photo)
    listed = list(list_objects(str(tmp_path)))
    (tmp_path / "changed.jpg").write_bytes(photo + b"\0")  # a new version after the listing
    pixels, images, errors = run_stage(listed)
    assert [i["path"] for i in images] == [str(tmp_path / "same.jpg")] and pixels.shape == (1, 32, 32, 3)
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert [(e["path"], e["stage"]) for e in errors] == [(str(tmp_path / "changed.jpg"), "read")]
    assert "changed after it was listed" in errors[0]["error"]


def test_s3_object_changed_or_deleted_after_listing(s3_server, s3_bucket):
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    photo = corpus()["photo.webp"].data
    for key in ("in/same.webp", "in/changed.webp", "in/deleted.webp"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=photo)
    listed = list(list_objects(f"s3://{s3_bucket}/in/"))
    client.put_object(Bucket=s3_bucket, Key="in/changed.webp", Body=corpus()["grey.jpg"].data)
    client.delete_object(Bucket=s3_bucket, Key="in/deleted.webp")
    _, images, errors = run_stage(listed)
    assert [i["path"] for i in images] == [f"s3://{s3_bucket}/in/same.webp"]
    reasons = {e["path"].rsplit("/", 1)[1]: (e["stage"], e["error"]) for e in errors}
    assert reasons["changed.webp"] == ("read", reasons["changed.webp"][1])
    assert "changed after it was listed" in reasons["changed.webp"][1]
    assert reasons["deleted.webp"][0] == "read" and "NoSuchKey" in reasons["deleted.webp"][1]
