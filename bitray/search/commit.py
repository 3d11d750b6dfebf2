"""The commit point of an index: ``index.json`` replaced only if it still names the generation an update
started from (compare-and-swap), so of two concurrent updates one wins and the other is told.

S3: a read with its ETag, then ``If-Match`` (or ``If-None-Match: *`` for a new index), atomic on the
server. GCS: the same with generation preconditions. Local: an exclusive ``flock`` on ``index.json.lock``
around read, compare and atomic rename (one host; not for NFS).
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from bitray import storage
from bitray.config import StorageConfig
from bitray.errors import BitrayError


class CommitConflict(BitrayError):
    """Another update moved ``index.json`` since this one began."""


def commit_meta(
    meta_uri: str, data: bytes, expected_generation: str | None, storage_config: StorageConfig | None
) -> None:
    """Write ``data`` to ``meta_uri`` if its generation is still ``expected_generation`` (None: absent)."""
    if storage.is_remote(meta_uri):
        obj = storage.conditional_object(meta_uri, storage_config or StorageConfig(), timeout_s=30.0)
        held = obj.read()
        _check(meta_uri, None if held is None else _generation(held[0]), expected_generation)
        tag = obj.create(data) if held is None else obj.replace(data, held[1])
        if tag is None:
            _check(meta_uri, "(changed during the commit)", expected_generation)
        return
    path = storage.local_path(meta_uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(str(path) + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = _generation(path.read_bytes()) if path.exists() else None
            _check(meta_uri, current, expected_generation)
            storage.write_bytes(str(path), data)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _generation(data: bytes) -> str | None:
    try:
        return json.loads(data).get("generation")
    except ValueError:
        return "(unreadable)"


def _check(uri: str, current: str | None, expected: str | None) -> None:
    if current != expected:
        raise CommitConflict(
            f"{uri} was updated by another bitray index while this one ran (generation {current}, "
            f"expected {expected}); this update was rolled back: run bitray index again"
        )
