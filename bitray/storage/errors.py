"""Telling object-store failures apart: the one place that reads botocore's error responses.

``error_code()`` and ``http_status()`` read a ``ClientError``; ``is_transient()`` and ``read_error()``
classify a failed read (``TransientStorageError`` vs the ``PermanentReadError`` subclasses); ``s3_errors``
turns a missing bucket, refused credentials or an unreachable endpoint into one clear ``BitrayError``.
"""

from __future__ import annotations

from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.redaction import redacted
from bitray.storage.uri import split_bucket


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

        endpoint = redacted(self.storage.resolved_s3_endpoint() or "AWS S3")
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
