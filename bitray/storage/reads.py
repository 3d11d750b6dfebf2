"""Reading exactly the listed version of an object (``read_object``), retrying transient failures."""

from __future__ import annotations

import functools
import os
import random
import stat
import time
from typing import BinaryIO

from bitray.config import StorageConfig
from bitray.storage.clients import gcs_client, shared_s3_client
from bitray.storage.conditional import get_object_if_match, get_with_etag
from bitray.storage.errors import (
    CREDENTIAL_CODES,
    ObjectChanged,
    ObjectMissing,
    ObjectTooLarge,
    PermanentReadError,
    ReadRefused,
    TransientStorageError,
    error_code,
    is_transient,
    read_error,
)
from bitray.storage.uri import ObjectInfo, local_path, scheme_of, split_bucket

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
    the read. GCS: ``ifGenerationMatch`` on the listed generation, and the size checked. Permanent failures
    raise a ``PermanentReadError`` subclass
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


def read_at_most(uri: str, max_bytes: int, storage: StorageConfig | None = None) -> bytes:
    """The current bytes of ``uri``, never more than ``max_bytes`` read or held: ``ObjectTooLarge`` beyond.

    For reads whose size nobody vouches for (a path taken from an index file): at most ``max_bytes + 1``
    bytes are requested (an S3 or GCS range, a bounded read of a regular local file), so neither a huge
    object nor ``/dev/zero`` can exhaust memory. ``ObjectMissing`` / ``ReadRefused`` as ``read_object``.
    """
    storage = storage or StorageConfig()
    scheme = scheme_of(uri)
    if scheme == "file":
        try:
            with _open_regular(local_path(uri), uri) as handle:
                data = handle.read(max_bytes + 1)
        except FileNotFoundError:
            raise ObjectMissing(f"{uri} does not exist") from None
        except (PermissionError, IsADirectoryError) as exc:
            raise ReadRefused(f"cannot read {uri}: {exc.strerror}") from None
    elif scheme == "s3":
        data = _s3_head_bytes(uri, max_bytes + 1, storage)
    else:
        data = _gs_head_bytes(uri, max_bytes + 1, storage)
    if len(data) > max_bytes:
        raise ObjectTooLarge(f"{uri} is over the cap of {max_bytes:,} bytes (max_bytes)")
    return data


def _s3_head_bytes(uri: str, count: int, storage: StorageConfig) -> bytes:
    from botocore.exceptions import ClientError

    bucket, key = split_bucket(uri)
    try:
        reply = shared_s3_client(storage).get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{count - 1}")
        return reply["Body"].read(count)
    except ClientError as exc:
        if error_code(exc) == "InvalidRange":  # an empty object has no byte 0
            return b""
        permanent = read_error(uri, exc)
        if permanent is not None:
            raise permanent from None
        raise PermanentReadError(f"cannot read {uri}: {error_code(exc)}: {exc}") from None


def _gs_head_bytes(uri: str, count: int, storage: StorageConfig) -> bytes:
    from google.api_core import exceptions as gexc

    bucket, key = split_bucket(uri)
    try:
        return _gcs_read_client(storage).bucket(bucket).blob(key).download_as_bytes(start=0, end=count - 1)
    except gexc.NotFound:
        raise ObjectMissing(f"{uri} does not exist") from None
    except gexc.RequestRangeNotSatisfiable:
        return b""
    except (gexc.Forbidden, gexc.Unauthorized) as exc:
        raise ReadRefused(f"reading {uri} was refused ({exc.code}); check the bucket's IAM") from None
    except gexc.GoogleAPICallError as exc:
        raise PermanentReadError(f"cannot read {uri}: {exc}") from None


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
        handle = _open_regular(path, obj.uri)
        with handle:
            before = os.fstat(handle.fileno())
            _check_local(obj, before.st_size, before.st_mtime_ns)
            data = handle.read(obj.size + 1)  # one byte more than listed: a grown file, never /dev/zero
            after = os.fstat(handle.fileno())
    except FileNotFoundError:
        raise ObjectMissing(f"{obj.uri} was listed but no longer exists") from None
    except (PermissionError, IsADirectoryError) as exc:
        raise ReadRefused(f"cannot read {obj.uri}: {exc.strerror}") from None
    _check_local(obj, after.st_size, after.st_mtime_ns)
    if len(data) != obj.size:
        raise ObjectChanged(f"{obj.uri} changed while it was read")
    return data


def _open_regular(path: os.PathLike | str, uri: str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file; a FIFO or device (which could block for ever
    or never end) is ``ReadRefused``. ``O_NONBLOCK`` keeps the open itself from waiting on a FIFO."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ReadRefused(f"cannot read {uri}: not a regular file")
    return os.fdopen(fd, "rb")


def _check_local(obj: ObjectInfo, size: int, mtime_ns: int) -> None:
    if size != obj.size or (obj.mtime_ns is not None and mtime_ns != obj.mtime_ns):
        raise ObjectChanged(
            f"{obj.uri} changed after it was listed (size {size}, listed {obj.size}; mtime_ns {mtime_ns}, "
            f"listed {obj.mtime_ns})"
        )


def _read_gs(obj: ObjectInfo, storage: StorageConfig) -> bytes:
    """The listed generation (``obj.etag``) only: ``ifGenerationMatch`` on the download, and the generation
    the server reports checked again (asked for when a server, such as an emulator, sends none)."""
    from google.api_core import exceptions as gexc

    bucket, key = split_bucket(obj.uri)
    generation = int(obj.etag) if obj.etag and obj.etag.isdigit() else None
    try:
        blob = _gcs_read_client(storage).bucket(bucket).blob(key)
        # at most one byte more than listed: a grown object is detected without reading all of it
        span = {"start": 0, "end": obj.size} if obj.size else {}
        data = blob.download_as_bytes(**span, if_generation_match=generation)
        if generation is not None and blob.generation is None:
            blob.reload()
    except gexc.NotFound:
        raise ObjectMissing(f"{obj.uri} was listed but no longer exists") from None
    except gexc.PreconditionFailed:
        raise ObjectChanged(f"{obj.uri} changed after it was listed (generation {obj.etag})") from None
    except (gexc.Forbidden, gexc.Unauthorized) as exc:
        raise ReadRefused(f"reading {obj.uri} was refused ({exc.code}); check the bucket's IAM") from None
    if generation is not None and int(blob.generation) != generation:
        raise ObjectChanged(
            f"{obj.uri} changed after it was listed (generation {blob.generation}, listed {generation})"
        )
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
