"""The CPU stage: manifest rows -> the listed version's bytes -> RGB uint8 pixels at the model's size.

Every input row leaves this stage as one row: pixels, or an error (stage ``read`` or ``decode``, with a
readable reason) and zero pixels. Rows already committed by an earlier attempt of the run are dropped
here, so a resumed run reads and decodes only what is pending. Pixels travel as uint8 (a quarter of
float32) in a tensor column; the model function converts them.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa

from bitray import storage
from bitray.config import StorageConfig
from bitray.embed.ranges import contains
from bitray.errors import BitrayError
from bitray.images import DEFAULT_MAX_PIXELS, prepare_for_model


class ObjectChanged(BitrayError):
    """The object is no longer the version the run listed."""


def decode_batch(
    batch: pa.Table,
    *,
    storage_config: StorageConfig,
    size: tuple[int, int],
    max_pixels: int | None,
    committed: tuple[np.ndarray, np.ndarray],
) -> pa.Table:
    """Read and decode a batch of manifest rows (``row, path, etag, size, mtime_ns``)."""
    from ray.data.extensions import ArrowTensorArray

    rows = batch.column("row").to_numpy()
    pending = ~contains(committed[0], committed[1], rows)
    batch = batch.filter(pa.array(pending))
    records = batch.to_pylist()
    pixels = np.zeros((len(records), *size, 3), np.uint8)
    width = np.zeros(len(records), np.int32)
    height = np.zeros(len(records), np.int32)
    stages: list[str | None] = [None] * len(records)
    errors: list[str | None] = [None] * len(records)
    limit = max_pixels or DEFAULT_MAX_PIXELS
    for i, record in enumerate(records):
        try:
            data = read_listed(record, storage_config)
        except Exception as exc:
            stages[i], errors[i] = "read", describe(exc)
            continue
        try:
            pixels[i], width[i], height[i] = prepare_for_model(data, size, max_pixels=limit)
        except Exception as exc:
            stages[i], errors[i] = "decode", describe(exc)
    return (
        batch.append_column("width", pa.array(width))
        .append_column("height", pa.array(height))
        .append_column("stage", pa.array(stages, pa.string()))
        .append_column("error", pa.array(errors, pa.string()))
        .append_column("pixels", ArrowTensorArray.from_numpy(pixels))
    )


def read_listed(record: dict[str, Any], storage_config: StorageConfig) -> bytes:
    """The bytes of the object version the manifest lists, or ``ObjectChanged``.

    Without this check a row's etag/size/mtime could describe other bytes than the ones embedded. The
    version that changed is recorded as a read error; an incremental run embeds the new version.
    """
    path = record["path"]
    if storage.scheme_of(path) == "s3" and record.get("etag"):
        from botocore.exceptions import ClientError

        bucket, key = storage.split_bucket(path)
        client = _s3_client(storage_config.s3_endpoint, storage_config.s3_region, storage_config.anonymous)
        with storage.s3_errors(path, storage_config):
            try:
                return client.get_object(Bucket=bucket, Key=key, IfMatch=record["etag"])["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code", "") not in ("PreconditionFailed", "412"):
                    raise
        raise ObjectChanged(f"{path} changed after it was listed (listed etag {record['etag']})")
    data = storage.read_bytes(path, storage_config)
    if storage.scheme_of(path) == "file":
        stat = storage.local_path(path).stat()
        if (len(data), stat.st_size, stat.st_mtime_ns) != (
            record["size"],
            record["size"],
            record["mtime_ns"],
        ):
            raise ObjectChanged(f"{path} changed after it was listed")
    return data


@functools.lru_cache(maxsize=4)
def _s3_client(endpoint: str | None, region: str | None, anonymous: bool):  # noqa: ANN202 - boto3 is untyped
    """One client per worker process: creating one costs far more than reading a small image."""
    return storage.s3_client(StorageConfig(s3_endpoint=endpoint, s3_region=region, anonymous=anonymous))


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
