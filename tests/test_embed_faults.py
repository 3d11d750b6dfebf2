"""The pipeline against a faulty object store: a proxy in front of moto answers 503/500, resets and cuts
responses for a share of the image GETs. Every image is embedded, no fault becomes an error row, keys with
URL syntax in them come back byte for byte, and a fault that persists stops the run resumably."""

from __future__ import annotations

import boto3
import pytest
from embed_fixtures import read_output, tiny_config, write_photos

from bitray.config import StorageConfig
from bitray.embed import run_embedding
from bitray.errors import BitrayError
from bitray.outputs import open_errors
from bitray.storage import s3_filesystem

pytest_plugins = ["fault_proxy"]
pytestmark = pytest.mark.slow

ODD_NAMES = ["summer #1.jpg", "what?.jpg", "100% + more.jpg", "café/été.jpg", "a//b.jpg", "dots....jpg"]


def upload(fault_proxy, bucket: str, tmp_path) -> list[str]:  # noqa: ANN001
    client = boto3.client("s3", endpoint_url=fault_proxy.upstream, region_name="us-east-1")
    photos = write_photos(tmp_path / "in", 24)
    names = [p.name for p in photos[: -len(ODD_NAMES)]] + ODD_NAMES
    for name, path in zip(names, photos, strict=True):
        client.put_object(Bucket=bucket, Key=f"photos/{name}", Body=path.read_bytes())
    return sorted(f"s3://{bucket}/photos/{name}" for name in names)


def test_transient_faults_heal_and_keys_stay_as_stored(fault_proxy, s3_bucket, ray_local, tmp_path):
    keys = upload(fault_proxy, s3_bucket, tmp_path)
    fault_proxy.set_faults(
        rate=0.3,
        kinds=("503", "500", "reset", "truncate"),
        methods=("GET",),
        match=lambda m, p: "/photos/" in p,
    )
    storage = StorageConfig(s3_endpoint=fault_proxy.url, read_retry_s=60)
    out = f"s3://{s3_bucket}/out"
    summary = run_embedding(tiny_config([f"s3://{s3_bucket}/photos/"], out, storage=storage, run_id="faulty"))
    assert sum(fault_proxy.injected.values()) > 3, fault_proxy.injected
    assert (summary.inputs, summary.embedded, summary.errored) == (len(keys), len(keys), 0)
    emb, err = read_output(f"{s3_bucket}/out", s3_filesystem(StorageConfig(s3_endpoint=fault_proxy.upstream)))
    assert err.empty and sorted(emb.path) == keys  # byte for byte, `#`, `?`, `%`, `//` and all


def test_a_persistent_fault_stops_the_run_resumably(fault_proxy, s3_bucket, ray_local, tmp_path):
    keys = upload(fault_proxy, s3_bucket, tmp_path)
    fault_proxy.set_faults(rate=1.0, kinds=("503",), methods=("GET",), match=lambda m, p: "what%3F" in p)
    storage = StorageConfig(s3_endpoint=fault_proxy.url, read_retry_s=2)
    config = tiny_config(
        [f"s3://{s3_bucket}/photos/"], f"s3://{s3_bucket}/out", storage=storage, run_id="stuck"
    )
    with pytest.raises(
        BitrayError, match=r"what\?\.jpg kept failing for 2 s .* run again with the same run id"
    ):
        run_embedding(config)
    fault_proxy.clear()  # the store recovers: the same run id finishes the run, no image lost or doubled
    summary = run_embedding(config)
    assert (summary.embedded, summary.errored) == (len(keys), 0)
    emb, err = read_output(f"{s3_bucket}/out", s3_filesystem(StorageConfig(s3_endpoint=fault_proxy.upstream)))
    assert err.empty and sorted(emb.path) == keys


def test_access_refused_is_an_error_row_that_a_retry_embeds_once_granted(
    fault_proxy, s3_bucket, ray_local, tmp_path
):
    keys = upload(fault_proxy, s3_bucket, tmp_path)
    fault_proxy.set_faults(rate=1.0, kinds=("403",), methods=("GET",), match=lambda m, p: "summer" in p)
    storage = StorageConfig(s3_endpoint=fault_proxy.url, read_retry_s=5)
    out = f"s3://{s3_bucket}/out"
    first = run_embedding(tiny_config([f"s3://{s3_bucket}/photos/"], out, storage=storage, run_id="refused"))
    assert (first.embedded, first.errored) == (len(keys) - 1, 1)  # 403 is permanent: recorded, not retried

    fault_proxy.clear()  # access granted
    retry = run_embedding(tiny_config([], out, storage=storage, retry_errors=True, run_id="granted"))
    assert (retry.inputs, retry.embedded, retry.errored) == (1, 1, 0)
    emb, err = read_output(f"{s3_bucket}/out", s3_filesystem(StorageConfig(s3_endpoint=fault_proxy.upstream)))
    assert sorted(emb.path) == keys  # each once, `summer #1.jpg` from the retry
    assert err.path.tolist() == [f"s3://{s3_bucket}/photos/summer #1.jpg"]
    assert err.error.iloc[0].startswith("ReadRefused")
    assert open_errors(out, storage) == []
