"""Conditional requests: an object read with its version's tag, written or deleted only if that tag holds.

S3 through ``If-None-Match``/``If-Match`` (``get_with_etag``, ``put_if_none_match``, ``put_if_match``,
``delete_if_match``); ``conditional_object()`` wraps S3 or GCS behind ``ConditionalObject`` for leases.
"""

from __future__ import annotations

from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.storage.clients import gcs_client, s3_client
from bitray.storage.errors import CONFLICT_CODES, MISSING_CODES, PRECONDITION_CODES, error_code, read_error
from bitray.storage.uri import scheme_of, split_bucket


def get_with_etag(uri: str, *, client) -> tuple[bytes, str] | None:  # noqa: ANN001 - boto3 client
    """An S3 object's bytes and ETag (quotes stripped), or None when it does not exist."""
    from botocore.exceptions import ClientError

    bucket, key = split_bucket(uri)
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if error_code(exc) in MISSING_CODES - {"NoSuchBucket"}:
            return None
        raise
    return obj["Body"].read(), _etag(obj["ETag"])


def get_object_if_match(uri: str, etag: str, *, client) -> bytes:  # noqa: ANN001
    """The bytes of exactly the version with ``etag``; raises ``ObjectChanged`` (412), ``ObjectMissing``,
    ``ReadRefused`` or botocore's own exception for anything else."""
    from botocore.exceptions import ClientError

    bucket, key = split_bucket(uri)
    try:
        obj = client.get_object(Bucket=bucket, Key=key, IfMatch=_quoted(etag))
        data = obj["Body"].read()
    except ClientError as exc:
        permanent = read_error(uri, exc)
        if permanent is not None:
            raise permanent from None
        raise
    if len(data) != int(obj.get("ContentLength", len(data))):
        from botocore.exceptions import IncompleteReadError

        raise IncompleteReadError(actual_bytes=len(data), expected_bytes=obj["ContentLength"])
    return data


def put_if_none_match(uri: str, data: bytes, *, client) -> str | None:  # noqa: ANN001
    """Create the object only if it does not exist; its ETag, or None when it already exists."""
    return _put(uri, data, client, IfNoneMatch="*")


def put_if_match(uri: str, data: bytes, etag: str, *, client) -> str | None:  # noqa: ANN001
    """Replace the object only if its ETag is still ``etag``; the new ETag, or None when it changed, was
    deleted, or a concurrent conditional write conflicted (S3's 409: re-read and decide)."""
    return _put(uri, data, client, IfMatch=_quoted(etag))


def delete_if_match(uri: str, etag: str, *, client) -> bool:  # noqa: ANN001
    """Delete the object only if its ETag is still ``etag``; False when it changed or is gone."""
    from botocore.exceptions import ClientError

    bucket, key = split_bucket(uri)
    try:
        client.delete_object(Bucket=bucket, Key=key, IfMatch=_quoted(etag))
    except ClientError as exc:
        if error_code(exc) in PRECONDITION_CODES | CONFLICT_CODES | MISSING_CODES:
            return False
        raise
    return True


def _put(uri: str, data: bytes, client, **condition: str) -> str | None:  # noqa: ANN001
    from botocore.exceptions import ClientError

    bucket, key = split_bucket(uri)
    try:
        return _etag(client.put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"])
    except ClientError as exc:
        if error_code(exc) in PRECONDITION_CODES | CONFLICT_CODES | MISSING_CODES - {"NoSuchBucket"}:
            return None
        raise


def _etag(value: str) -> str:
    return value.strip('"')


def _quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


class ConditionalObject:
    """One small object written only under preconditions (a lease): the interface ``bitray.locks`` uses.

    ``tag`` is the object's version as the store reports it (the S3 ETag, the GCS generation); every write
    returns the new tag, or None when its precondition failed.
    """

    uri: str

    def read(self) -> tuple[bytes, str] | None:
        raise NotImplementedError

    def create(self, data: bytes) -> str | None:
        raise NotImplementedError

    def replace(self, data: bytes, tag: str) -> str | None:
        raise NotImplementedError

    def delete(self, tag: str) -> bool:
        raise NotImplementedError


class S3ConditionalObject(ConditionalObject):
    """Conditional PUT/DELETE on S3 (``If-None-Match: *``, ``If-Match``): atomic on the server."""

    def __init__(self, uri: str, client) -> None:  # noqa: ANN001
        self.uri = uri
        self.client = client

    def read(self) -> tuple[bytes, str] | None:
        return get_with_etag(self.uri, client=self.client)

    def create(self, data: bytes) -> str | None:
        return put_if_none_match(self.uri, data, client=self.client)

    def replace(self, data: bytes, tag: str) -> str | None:
        return put_if_match(self.uri, data, tag, client=self.client)

    def delete(self, tag: str) -> bool:
        return delete_if_match(self.uri, tag, client=self.client)


class GcsConditionalObject(ConditionalObject):
    """Conditional writes on GCS through google-cloud-storage's generation preconditions
    (``if_generation_match=0`` creates only; ``if_generation_match=G`` replaces or deletes only version G):
    atomic on the server like S3's. Without google-cloud-storage installed, ``conditional_object`` refuses
    ``gs://`` leases rather than fall back to unconditional writes."""

    def __init__(self, uri: str, bucket, timeout_s: float = 60.0) -> None:  # noqa: ANN001 - a gcs Bucket
        self.uri = uri
        self.bucket = bucket
        self.timeout = timeout_s
        _, self.key = split_bucket(uri)

    def read(self) -> tuple[bytes, str] | None:
        from google.api_core import exceptions as gexc

        blob = self.bucket.blob(self.key)
        try:
            data = blob.download_as_bytes(timeout=self.timeout)
            generation = blob.generation
            if generation is None:  # a server that sent no x-goog-generation: ask, then re-read that one
                blob.reload(timeout=self.timeout)
                generation = blob.generation
                data = blob.download_as_bytes(if_generation_match=generation, timeout=self.timeout)
        except (gexc.NotFound, gexc.PreconditionFailed):
            return None
        return data, str(generation)

    def create(self, data: bytes) -> str | None:
        return self._upload(data, 0)

    def replace(self, data: bytes, tag: str) -> str | None:
        return self._upload(data, int(tag))

    def delete(self, tag: str) -> bool:
        from google.api_core import exceptions as gexc

        try:
            self.bucket.blob(self.key).delete(if_generation_match=int(tag), timeout=self.timeout)
        except (gexc.PreconditionFailed, gexc.NotFound):
            return False
        return True

    def _upload(self, data: bytes, generation: int) -> str | None:
        from google.api_core import exceptions as gexc

        blob = self.bucket.blob(self.key)
        try:
            blob.upload_from_string(
                data, content_type="application/json", if_generation_match=generation, timeout=self.timeout
            )
        except (gexc.PreconditionFailed, gexc.NotFound, gexc.Conflict):
            return None
        if blob.generation is None:  # GCS returns the new generation; an emulator may not
            blob.reload(timeout=self.timeout)
        return str(blob.generation)


def conditional_object(uri: str, storage: StorageConfig, *, timeout_s: float = 5.0) -> ConditionalObject:
    """A ``ConditionalObject`` for an ``s3://`` or ``gs://`` URI whose requests each give up after about
    ``timeout_s`` (a dedicated client: a lease must never wait on the data path's long timeouts)."""
    scheme = scheme_of(uri)
    if scheme == "s3":
        return S3ConditionalObject(uri, s3_client(storage, timeout_s=timeout_s, max_attempts=2))
    if scheme == "gs":
        bucket, _ = split_bucket(uri)
        return GcsConditionalObject(uri, gcs_client(storage).bucket(bucket), timeout_s)
    raise BitrayError(f"{uri!r}: conditional writes need an object store (s3:// or gs://)")
