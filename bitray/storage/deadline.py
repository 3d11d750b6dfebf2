"""S3 requests that must end by a deadline (a lease's fence), retried while time is left.

The shared client waits up to 60 s per try and tries 4 times: minutes, far past a lease's fence. A request
given a ``deadline`` (a ``time.monotonic()`` instant) instead goes out through a client whose connect and
read timeouts end at the deadline, one try at a time; a transient failure is retried only while time is
left, and ``DeadlinePassed`` says the deadline came first (the request's outcome is then unknown).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bitray.config import StorageConfig
from bitray.storage.clients import CREDENTIAL_ENV, s3_client, shared_s3_client
from bitray.storage.errors import TransientStorageError, is_transient

T = TypeVar("T")

MIN_REQUEST_S = 0.05
"""A try is not started with less time left than this."""
_STEPS_PER_DOUBLING = 4
"""Timeouts are rounded down to 2**(k/4) s, so a handful of cached clients serve every deadline."""


class DeadlinePassed(TransientStorageError):
    """A request could not be made, or could not finish, before its deadline."""


def s3_request(storage: StorageConfig, deadline: float | None, request: Callable[[Any], T], what: str) -> T:
    """``request(client)`` with a boto3 client; with ``deadline``, every try ends by it (see above)."""
    if deadline is None:
        return request(shared_s3_client(storage))
    pause = MIN_REQUEST_S
    while True:
        left = deadline - time.monotonic()
        if left < MIN_REQUEST_S:
            raise DeadlinePassed(f"{what} could not be made before its deadline")
        try:
            return request(_deadline_client(storage, left))
        except Exception as exc:
            left = deadline - time.monotonic()
            if not is_transient(exc):
                raise
            if left < pause + MIN_REQUEST_S:
                raise DeadlinePassed(f"{what} did not finish before its deadline: {exc}") from None
            time.sleep(pause)
            pause = min(2 * pause, 1.0)


def seconds_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (at least ``MIN_REQUEST_S``), or None without one: for clients that take
    a timeout (google-cloud-storage)."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left < MIN_REQUEST_S:
        raise DeadlinePassed("a request could not be made before its deadline")
    return left


def _deadline_client(storage: StorageConfig, left: float):  # noqa: ANN202 - boto3 clients are untyped
    timeout = 2 ** (math.floor(math.log2(left) * _STEPS_PER_DOUBLING) / _STEPS_PER_DOUBLING)
    environment = "\0".join(os.environ.get(k, "") for k in CREDENTIAL_ENV)
    credentials = hashlib.sha256(environment.encode()).hexdigest()
    return _cached_client(
        storage.resolved_s3_endpoint(), storage.resolved_s3_region(), storage.anonymous, credentials, timeout
    )


@functools.lru_cache(maxsize=32)
def _cached_client(endpoint: str | None, region: str, anonymous: bool, _credentials: str, timeout: float):  # noqa: ANN202
    config = StorageConfig(s3_endpoint=endpoint, s3_region=region, anonymous=anonymous)
    return s3_client(config, timeout_s=timeout, max_attempts=1)
