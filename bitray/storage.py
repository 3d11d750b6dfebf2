"""One view of object storage: URIs (``s3://``, ``gs://``, local paths) -> listings, objects, filesystems.

Listing streams, and yields objects in code-point order of their URIs whatever the scheme: S3 through
boto3's paginator (pages of 1,000 keys, with the ETags pyarrow's ``FileInfo`` lacks), GCS through
google-cloud-storage's ``list_blobs`` (page by page; GCS, like S3, lists in UTF-8 byte order), local
directories by a walk that sorts a directory as ``name + "/"``. Parquet goes through pyarrow filesystems
(``filesystem_for``). Credentials come from the standard AWS and Google chains and are never printed.

Keys are kept exactly as stored. An ``s3://`` or ``gs://`` URI is split at the first ``/`` after the
bucket and never parsed as a URL, so ``s3://b/photos/summer #1.jpg`` names the key ``photos/summer #1.jpg``
(``#``, ``?``, ``%``, ``+``, spaces, unicode, ``//`` and trailing dots included); a local path is used as
written (a ``file://`` prefix is dropped, nothing is percent-decoded). pyarrow refuses S3 keys with empty
path components (``a//b``), so whole-object reads, writes, deletes and existence checks on S3 go through
boto3, which sends any key as it is.

Every object-store protocol detail lives here, so no other module reads botocore's error codes: one
``error_code()``, the classification of read failures (``PermanentReadError`` subclasses vs
``TransientStorageError``), and conditional requests (``get_with_etag``, ``put_if_none_match``,
``put_if_match``, ``delete_if_match``, and ``conditional_object()`` for leases).
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from bitray.config import StorageConfig
from bitray.errors import BitrayError

REMOTE_SCHEMES = ("s3", "gs", "gcs")


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: where it is and which version of it was seen."""

    uri: str
    size: int
    mtime_ns: int | None = None
    etag: str | None = None

    @property
    def version(self) -> str:
        """A string that changes whenever the object's content may have changed."""
        if self.etag:
            return f"etag:{self.etag}"
        return f"size:{self.size}:mtime_ns:{self.mtime_ns}"


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(uri: str) -> str:
    """``s3``, ``gs`` or ``file`` (``gcs://`` is ``gs``; a path without ``scheme://`` is local)."""
    match = _SCHEME.match(uri)
    if match is None:
        return "file"
    scheme = match.group(1).lower()
    if scheme == "gcs":
        return "gs"
    if scheme in ("s3", "gs", "file"):
        return scheme
    raise BitrayError(f"{uri!r}: unsupported storage scheme {scheme!r}; use s3://, gs:// or a local path")


def is_remote(uri: str) -> bool:
    return scheme_of(uri) != "file"


def local_path(uri: str) -> Path:
    """The absolute local path of a ``file://`` URI or plain path, with the name exactly as written."""
    raw = uri[len("file://") :] if uri[:7].lower() == "file://" else uri
    return Path(raw).expanduser().absolute()


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with ``/`` (no URL quoting: names stay as given)."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def split_bucket(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``): the key is everything after the bucket's ``/``, as is."""
    match = _SCHEME.match(uri)
    rest = uri[match.end() :] if match else uri
    bucket, _, key = rest.partition("/")
    if not bucket:
        scheme = match.group(1) if match else "s3"
        raise BitrayError(f"{uri!r} names no bucket; write it as {scheme}://BUCKET/PREFIX")
    return bucket, key


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


def matches(name: str, extensions: Iterable[str] | None) -> bool:
    if extensions is None:
        return True
    lower = name.lower()
    return any(
        lower.endswith(ext.lower() if ext.startswith(".") else f".{ext.lower()}") for ext in extensions
    )


def list_objects(
    uri: str,
    *,
    extensions: Iterable[str] | None = None,
    storage: StorageConfig | None = None,
) -> Iterator[ObjectInfo]:
    """Stream every object under ``uri`` (a prefix or a single object), without reading any bytes.

    Directory markers (keys ending in ``/``) are not objects and are never yielded. Raises
    ``BitrayError`` for a missing bucket or path, refused credentials or an unreachable endpoint.
    """
    exts = tuple(extensions) if extensions is not None else None
    scheme = scheme_of(uri)
    if scheme == "s3":
        yield from _list_s3(uri, exts, storage or StorageConfig())
    elif scheme == "file":
        yield from _list_local(uri, exts)
    else:
        yield from _list_gs(uri, exts, storage or StorageConfig())


def _list_local(uri: str, exts: tuple[str, ...] | None) -> Iterator[ObjectInfo]:
    root = local_path(uri)
    if root.is_file():
        st = root.stat()
        yield ObjectInfo(str(root), st.st_size, st.st_mtime_ns)
        return
    if not root.is_dir():
        raise BitrayError(f"input {uri!r} does not exist; check the path")
    yield from _walk_sorted(root, exts)


def _walk_sorted(directory: Path, exts: tuple[str, ...] | None) -> Iterator[ObjectInfo]:
    """Depth-first in code-point order of the full path, the order S3 lists keys in: a directory sorts as
    ``name + "/"``, so ``a-c.jpg`` comes before ``a/b.jpg`` (``-`` < ``/``) and ``a0.jpg`` after it."""
    try:
        entries = [(entry, _is_dir(entry)) for entry in os.scandir(directory)]
    except OSError:
        return  # removed or unreadable while listing
    entries.sort(key=lambda item: item[0].name + "/" if item[1] else item[0].name)
    for entry, is_dir in entries:
        if is_dir:
            yield from _walk_sorted(Path(entry.path), exts)
        elif matches(entry.name, exts):
            try:
                st = entry.stat()
            except OSError:
                continue  # removed while listing: not an input of this run
            yield ObjectInfo(entry.path, st.st_size, st.st_mtime_ns)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _list_s3(uri: str, exts: tuple[str, ...] | None, storage: StorageConfig) -> Iterator[ObjectInfo]:
    bucket, prefix = split_bucket(uri)
    client = s3_client(storage)
    paginator = client.get_paginator("list_objects_v2")
    with s3_errors(uri, storage):
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/") or not matches(key, exts):
                    continue
                if prefix and key != prefix and not prefix.endswith("/") and not key.startswith(prefix + "/"):
                    continue  # prefix "a/b" must not match "a/bc/x.jpg"
                yield ObjectInfo(
                    uri=f"s3://{bucket}/{key}",
                    size=int(obj["Size"]),
                    mtime_ns=int(obj["LastModified"].timestamp() * 1e9),
                    etag=str(obj.get("ETag", "")).strip('"') or None,
                )


def _list_gs(uri: str, exts: tuple[str, ...] | None, storage: StorageConfig) -> Iterator[ObjectInfo]:
    """GCS lists names in UTF-8 byte order, like S3: stream it page by page (1,000 per request)."""
    from google.api_core import exceptions as gexc

    bucket, prefix = split_bucket(uri)
    client = gcs_client(storage)
    try:
        for blob in client.list_blobs(bucket, prefix=prefix, page_size=1000):
            name = blob.name
            if name.endswith("/") or not matches(name, exts):
                continue
            if prefix and name != prefix and not prefix.endswith("/") and not name.startswith(prefix + "/"):
                continue  # prefix "a/b" must not match "a/bc/x.jpg"
            yield ObjectInfo(f"gs://{bucket}/{name}", int(blob.size or 0), _ns(blob.updated))
    except gexc.NotFound:
        raise BitrayError(f"bucket {bucket!r} of {uri!r} does not exist") from None
    except (gexc.Forbidden, gexc.Unauthorized) as exc:
        raise BitrayError(
            f"access to {uri!r} was refused ({exc.code}); check the Google credentials "
            "(GOOGLE_APPLICATION_CREDENTIALS or the workload identity)"
        ) from None
    except gexc.GoogleAPIError as exc:
        raise BitrayError(f"cannot list {uri!r}: {exc}") from None


def _ns(moment) -> int | None:  # noqa: ANN001 - a datetime or None
    """A timezone-aware datetime as integer nanoseconds since the epoch, without float rounding."""
    if moment is None:
        return None
    import datetime as dt

    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


class s3_errors:  # noqa: N801 - used as a context manager, reads like a function
    """Turn boto3 errors about the bucket, credentials or endpoint into one clear ``BitrayError``."""

    def __init__(self, uri: str, storage: StorageConfig) -> None:
        self.uri = uri
        self.storage = storage

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:  # noqa: ANN001
        if exc is None:
            return False
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        endpoint = self.storage.resolved_s3_endpoint() or "AWS S3"
        if isinstance(exc, ClientError):
            code = error_code(exc)
            if code in ("NoSuchBucket", "404"):
                bucket, _ = split_bucket(self.uri)
                raise BitrayError(f"bucket {bucket!r} of {self.uri!r} does not exist at {endpoint}") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
                raise BitrayError(
                    f"access to {self.uri!r} was refused ({code}); check the AWS credentials "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role)"
                ) from None
            raise BitrayError(f"S3 error on {self.uri!r}: {code}: {exc}") from None
        if isinstance(exc, EndpointConnectionError | ReadTimeoutError):
            raise BitrayError(
                f"cannot reach the S3 endpoint {endpoint} for {self.uri!r}; check storage.s3_endpoint "
                "or AWS_ENDPOINT_URL_S3 and the network"
            ) from None
        if isinstance(exc, NoCredentialsError):
            raise BitrayError(
                f"no AWS credentials found for {self.uri!r}; set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, or storage.anonymous: true for a public bucket"
            ) from None
        return False


# -- errors: the one place that reads botocore's exceptions ------------------------------------------------


class PermanentReadError(BitrayError):
    """Reading a listed object failed for a reason retrying cannot fix: record it as an error row."""


class ObjectChanged(PermanentReadError):
    """The object is no longer the version the run listed (S3 412, or another size or mtime)."""


class ObjectMissing(PermanentReadError):
    """The object was listed but is gone (404)."""


class ReadRefused(PermanentReadError):
    """The store refused to read this object (403 AccessDenied) though it listed it."""


class ObjectTooLarge(PermanentReadError):
    """The listed size is over the per-object cap; decided from the listing, without a GET."""


class TransientStorageError(BitrayError):
    """The store kept failing in a way that usually heals (throttling, 5xx, timeouts, resets, expired
    credentials) for longer than the retry budget. Never an error row: stop the run, it resumes later."""


PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
CONFLICT_CODES = frozenset({"ConditionalRequestConflict", "OperationAborted", "409"})
MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
REFUSED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "403"})
CREDENTIAL_CODES = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "TokenRefreshRequired",
        "RequestExpired",
        "InvalidToken",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "RequestTimeTooSkewed",
    }
)
"""Credentials that ran out or were rotated mid-run: transient for a read (fix them and resume), so a
whole run's objects do not become error rows at once."""
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "BadDigest",  # a body damaged in transit
        "IncompleteBody",
        "429",
    }
)


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` (``PreconditionFailed``, ``NoSuchKey``, ``404``...);
    ``""`` for any other exception."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", "") or "")


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ``ClientError``, or None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status else None


def is_transient(exc: BaseException) -> bool:
    """Whether a failed S3 request is worth retrying: throttling, 5xx, timeouts, resets, expired tokens."""
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
        ResponseStreamingError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )

    if isinstance(exc, ClientError):
        code = error_code(exc)
        status = http_status(exc) or 0
        return code in TRANSIENT_CODES or code in CREDENTIAL_CODES or status >= 500 or status == 429
    if isinstance(exc, NoCredentialsError):
        return True  # a credential refresh failed for a moment (instance metadata, SSO)
    return isinstance(
        exc,
        BotoConnectionError
        | HTTPClientError
        | IncompleteReadError
        | ResponseStreamingError
        | ConnectionError
        | TimeoutError,
    ) or type(exc).__module__.startswith("urllib3")


def read_error(uri: str, exc: BaseException) -> PermanentReadError | None:
    """The permanent read error an S3 failure means, or None when it is transient or unknown."""
    code = error_code(exc)
    if code in PRECONDITION_CODES:
        return ObjectChanged(f"{uri} changed after it was listed (the store answered {code})")
    if code in MISSING_CODES:
        return ObjectMissing(f"{uri} was listed but no longer exists ({code})")
    if code in REFUSED_CODES:
        return ReadRefused(f"reading {uri} was refused ({code}); check the bucket policy for this key")
    return None


# -- conditional requests -----------------------------------------------------------------------------------


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


# -- reading one listed version -----------------------------------------------------------------------------

READ_RETRY_S = 120.0
"""How long ``read_object`` retries a transient failure before raising ``TransientStorageError``."""


def read_object(
    obj: ObjectInfo,
    storage: StorageConfig,
    *,
    max_bytes: int | None = None,
    retry_for_s: float = READ_RETRY_S,
) -> bytes:
    """The bytes of exactly the listed version of ``obj``, or a typed error.

    S3: ``GetObject`` with ``If-Match`` on the listed ETag. Local: size and mtime checked before and after
    the read. GCS: the size checked. Permanent failures raise a ``PermanentReadError`` subclass
    (``ObjectChanged``, ``ObjectMissing``, ``ReadRefused``, ``ObjectTooLarge``: the last decided from the
    listed size, before any request). Transient failures are retried with exponential backoff and full
    jitter (0.1 s doubling to 10 s) for up to ``retry_for_s``, then raise ``TransientStorageError``.
    """
    if max_bytes is not None and obj.size > max_bytes:
        raise ObjectTooLarge(f"{obj.uri} is {obj.size:,} bytes, over the cap of {max_bytes:,} (max_bytes)")
    scheme = scheme_of(obj.uri)
    reader = {"s3": _read_s3, "file": _read_local, "gs": _read_gs}[scheme]
    deadline = time.monotonic() + retry_for_s
    attempt = 0
    while True:
        try:
            data = reader(obj, storage)
        except PermanentReadError:
            raise
        except Exception as exc:
            if not _retryable(scheme, exc, obj.uri):
                raise
            pause = random.uniform(0, min(10.0, 0.1 * 2**attempt))
            attempt += 1
            if time.monotonic() + pause > deadline:
                cause = (
                    "the credentials expired or were rotated: refresh them"
                    if error_code(exc) in CREDENTIAL_CODES
                    else "the store is throttling, failing or unreachable"
                )
                raise TransientStorageError(
                    f"reading {obj.uri} kept failing for {retry_for_s:g} s ({attempt} attempts; last: "
                    f"{type(exc).__name__}: {exc}); {cause}. Nothing was recorded for it: run again with "
                    "the same run id to resume once it recovers"
                ) from exc
            time.sleep(pause)
            continue
        if max_bytes is not None and len(data) > max_bytes:  # the listing understated the size
            raise ObjectTooLarge(f"{obj.uri} is over the cap of {max_bytes:,} bytes (max_bytes)")
        return data


def _retryable(scheme: str, exc: BaseException, uri: str) -> bool:
    """Transient: retry. Permanent but unnamed (an S3 4xx nobody listed here): a ``PermanentReadError``.
    Anything else (a bug) propagates as it is."""
    if scheme == "file":
        return isinstance(exc, OSError)
    if scheme == "gs":
        from google.api_core import exceptions as gexc

        if _gcs_transient(exc):
            return True
        if isinstance(exc, gexc.GoogleAPICallError):
            raise PermanentReadError(f"cannot read {uri}: {exc}") from None
        return False
    if is_transient(exc):
        return True
    if error_code(exc):
        raise PermanentReadError(f"cannot read {uri}: {error_code(exc)}: {exc}") from None
    return False


def _read_s3(obj: ObjectInfo, storage: StorageConfig) -> bytes:
    client = shared_s3_client(storage, retries=False)
    if obj.etag:
        return get_object_if_match(obj.uri, obj.etag, client=client)
    found = get_with_etag(obj.uri, client=client)
    if found is None:
        raise ObjectMissing(f"{obj.uri} was listed but no longer exists")
    if len(found[0]) != obj.size:
        raise ObjectChanged(
            f"{obj.uri} changed after it was listed (size {len(found[0])}, listed {obj.size})"
        )
    return found[0]


def _read_local(obj: ObjectInfo, storage: StorageConfig) -> bytes:
    path = local_path(obj.uri)
    try:
        with open(path, "rb") as handle:
            before = os.fstat(handle.fileno())
            _check_local(obj, before.st_size, before.st_mtime_ns)
            data = handle.read()
            after = os.fstat(handle.fileno())
    except FileNotFoundError:
        raise ObjectMissing(f"{obj.uri} was listed but no longer exists") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise ReadRefused(f"cannot read {obj.uri}: {exc.strerror}") from None
    _check_local(obj, after.st_size, after.st_mtime_ns)
    if len(data) != obj.size:
        raise ObjectChanged(f"{obj.uri} changed while it was read")
    return data


def _check_local(obj: ObjectInfo, size: int, mtime_ns: int) -> None:
    if size != obj.size or (obj.mtime_ns is not None and mtime_ns != obj.mtime_ns):
        raise ObjectChanged(
            f"{obj.uri} changed after it was listed (size {size}, listed {obj.size}; mtime_ns {mtime_ns}, "
            f"listed {obj.mtime_ns})"
        )


def _read_gs(obj: ObjectInfo, storage: StorageConfig) -> bytes:
    from google.api_core import exceptions as gexc

    bucket, key = split_bucket(obj.uri)
    try:
        blob = _gcs_read_client(storage).bucket(bucket).blob(key)
        # at most one byte more than listed: a grown object is detected without reading all of it
        data = blob.download_as_bytes(start=0, end=obj.size) if obj.size else blob.download_as_bytes()
    except gexc.NotFound:
        raise ObjectMissing(f"{obj.uri} was listed but no longer exists") from None
    except (gexc.Forbidden, gexc.Unauthorized) as exc:
        raise ReadRefused(f"reading {obj.uri} was refused ({exc.code}); check the bucket's IAM") from None
    if len(data) != obj.size:
        raise ObjectChanged(f"{obj.uri} changed after it was listed (size {len(data)}, listed {obj.size})")
    return data


def _gcs_read_client(storage: StorageConfig):  # noqa: ANN202
    return _cached_gcs_client(storage.anonymous, os.environ.get("STORAGE_EMULATOR_HOST"))


@functools.lru_cache(maxsize=4)
def _cached_gcs_client(anonymous: bool, _emulator: str | None):  # noqa: ANN202
    return gcs_client(StorageConfig(anonymous=anonymous))


def _gcs_transient(exc: BaseException) -> bool:
    from google.api_core import exceptions as gexc

    if isinstance(exc, gexc.GoogleAPICallError):
        return isinstance(exc, gexc.ServerError | gexc.TooManyRequests)
    return isinstance(exc, OSError | gexc.RetryError) or type(exc).__module__.startswith(
        ("requests", "urllib3", "google.auth")
    )


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    """A whole object or file. S3 keys go through boto3, so any key is read as it is stored."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        with s3_errors(uri, storage):
            found = get_with_etag(uri, client=shared_s3_client(storage))
        if found is None:
            raise BitrayError(f"{uri!r} does not exist")
        return found[0]
    fs, path = filesystem_for(uri, storage)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise BitrayError(f"{uri!r} does not exist") from None
    except OSError as exc:
        raise BitrayError(f"cannot read {uri!r}: {exc}") from None


def read_if_exists(uri: str, storage: StorageConfig | None = None) -> bytes | None:
    """A whole object or file, or None when it does not exist: one request either way."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        with s3_errors(uri, storage):
            found = get_with_etag(uri, client=shared_s3_client(storage))
        return None if found is None else found[0]
    fs, path = filesystem_for(uri, storage)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BitrayError(f"cannot read {uri!r}: {exc}") from None


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write a whole object. Local files are written to a temporary name and renamed, so readers never
    see a partial file; object stores make a single PUT visible atomically by themselves. S3 keys go
    through boto3, so any key is written as given."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        bucket, key = split_bucket(uri)
        with s3_errors(uri, storage):
            shared_s3_client(storage).put_object(Bucket=bucket, Key=key, Body=data)
        return
    fs, path = filesystem_for(uri, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    try:
        with fs.open_output_stream(path) as out:
            out.write(data)
    except OSError as exc:
        raise BitrayError(f"cannot write {uri!r}: {exc}") from None


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    if scheme_of(uri) == "s3":
        from botocore.exceptions import ClientError

        storage = storage or StorageConfig()
        bucket, key = split_bucket(uri)
        with s3_errors(uri, storage):
            try:
                shared_s3_client(storage).head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return _s3_prefix_exists(uri, storage)
                raise
        return True
    fs, path = filesystem_for(uri, storage)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise BitrayError(f"cannot reach {uri!r}: {exc}") from None


def _s3_prefix_exists(uri: str, storage: StorageConfig) -> bool:
    """Whether ``uri`` is a "directory": some key starts with ``uri/`` (pyarrow's view, kept)."""
    bucket, key = split_bucket(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    page = shared_s3_client(storage).list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return bool(page.get("KeyCount") or page.get("Contents"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("BITRAY_CACHE_DIR", Path.home() / ".cache" / "bitray"))


def copy_to_local(uri: str, storage: StorageConfig | None = None, cache_dir: Path | None = None) -> Path:
    """A local copy of a remote file or directory (e.g. a SavedModel), cached by URI.

    Local inputs are returned as they are. The copy is made under a temporary name and renamed when
    complete, so an interrupted download is never mistaken for a cached one.
    """
    if not is_remote(uri):
        path = local_path(uri)
        if not path.exists():
            raise BitrayError(f"{uri!r} does not exist; check the path")
        return path
    fs, src = filesystem_for(uri, storage)
    try:
        info = fs.get_file_info(src)
    except OSError as exc:
        raise BitrayError(f"cannot reach {uri!r}: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise BitrayError(f"{uri!r} does not exist; check the bucket and key")
    cache = (cache_dir or default_cache_dir()) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache / Path(src).name
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache))
    try:
        # copy_files copies a single file or a whole directory tree alike
        pafs.copy_files(
            src,
            str(staging / target.name),
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        os.replace(staging / target.name, target)
    except OSError as exc:
        raise BitrayError(f"cannot copy {uri!r} to {cache}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def delete(uri: str, storage: StorageConfig | None = None) -> None:
    """Remove one file or object; a missing one is not an error."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        bucket, key = split_bucket(uri)
        with s3_errors(uri, storage):
            shared_s3_client(storage).delete_object(Bucket=bucket, Key=key)
        return
    fs, path = filesystem_for(uri, storage)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise BitrayError(f"cannot delete {uri!r}: {exc}") from None


def list_names(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """The sorted names directly under a directory or prefix; empty when it does not exist."""
    fs, path = filesystem_for(uri, storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as exc:
        raise BitrayError(f"cannot list {uri!r}: {exc}") from None
    return sorted(info.base_name for info in infos)


# -- S3 multipart uploads: how the embedding pipeline stages and commits its output files -----------------
#
# An upload that is not completed is invisible to every reader (LIST and GET alike), and completing it
# makes the whole object appear at once. Writers upload parts; a single committer completes or aborts.


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload of one object whose parts are uploaded but which is not completed yet."""

    uri: str
    upload_id: str
    parts: tuple[tuple[int, str], ...]  # (part number, ETag)


MULTIPART_PART_BYTES = 64 * 2**20


def upload_parts(uri: str, data: bytes, storage: StorageConfig) -> PendingUpload:
    """Start a multipart upload of ``data`` to ``uri`` and upload its parts, without completing it."""
    client = shared_s3_client(storage)
    bucket, key = split_bucket(uri)
    with s3_errors(uri, storage):
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        parts = []
        view = memoryview(data)
        for number, start in enumerate(range(0, max(len(data), 1), MULTIPART_PART_BYTES), start=1):
            chunk = view[start : start + MULTIPART_PART_BYTES]
            etag = client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=bytes(chunk)
            )["ETag"]
            parts.append((number, etag))
    return PendingUpload(uri, upload_id, tuple(parts))


def complete_upload(upload: PendingUpload, storage: StorageConfig) -> bool:
    """Complete ``upload``: its object appears whole. Idempotent: True when the object exists afterwards,
    False when the upload is gone and the object does not exist (aborted, or expired by a lifecycle rule)."""
    from botocore.exceptions import ClientError

    client = shared_s3_client(storage)
    bucket, key = split_bucket(upload.uri)
    parts = [{"PartNumber": number, "ETag": etag} for number, etag in upload.parts]
    with s3_errors(upload.uri, storage):
        try:
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload.upload_id, MultipartUpload={"Parts": parts}
            )
            return True
        except ClientError as exc:
            if error_code(exc) not in ("NoSuchUpload", "404"):
                raise
        return exists(upload.uri, storage)  # completed by an earlier attempt, or gone


def abort_upload(uri: str, upload_id: str, storage: StorageConfig) -> None:
    """Abort a multipart upload; an upload that is already gone is not an error."""
    from botocore.exceptions import ClientError

    client = shared_s3_client(storage)
    bucket, key = split_bucket(uri)
    with s3_errors(uri, storage):
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if error_code(exc) not in ("NoSuchUpload", "404"):
                raise


def pending_uploads(prefix_uri: str, storage: StorageConfig) -> Iterator[tuple[str, str]]:
    """(object URI, upload id) of each multipart upload in progress under ``prefix_uri``, paged."""
    client = shared_s3_client(storage)
    bucket, prefix = split_bucket(prefix_uri)
    with s3_errors(prefix_uri, storage):
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                yield f"s3://{bucket}/{upload['Key']}", upload["UploadId"]


def move_file(src: str, dst: str, storage: StorageConfig | None = None) -> bool:
    """Make ``src`` appear whole as ``dst``: a rename locally, a server-side copy then a delete elsewhere.

    Idempotent: True when ``dst`` exists afterwards, False when neither exists (nothing to move).
    """
    fs, src_path = filesystem_for(src, storage)
    _, dst_path = filesystem_for(dst, storage)
    try:
        if fs.get_file_info(src_path).type == pafs.FileType.NotFound:
            return fs.get_file_info(dst_path).type != pafs.FileType.NotFound
        if isinstance(fs, pafs.LocalFileSystem):
            Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src_path, dst_path)  # atomic on one filesystem
        else:
            fs.copy_file(src_path, dst_path)  # a server-side copy: the object appears whole
            fs.delete_file(src_path)
    except OSError as exc:
        raise BitrayError(f"cannot move {src!r} to {dst!r}: {exc}") from None
    return True


def delete_tree(uri: str, storage: StorageConfig | None = None) -> None:
    """Remove a directory or prefix and everything under it (on S3: a LIST and a batched DELETE per
    1,000 keys; nothing else, so no directory markers appear)."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        client = shared_s3_client(storage)
        bucket, prefix = split_bucket(uri.rstrip("/") + "/")
        with s3_errors(uri, storage):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        return
    fs, path = filesystem_for(uri, storage)
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise BitrayError(f"cannot delete {uri!r}: {exc}") from None
