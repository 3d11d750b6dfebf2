"""TEMPORARY shim (replaced by the storage branch's fencing locks): the old RunLock plus ``check``."""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from bitray import storage
from bitray.config import StorageConfig
from bitray.errors import BitrayError

log = logging.getLogger(__name__)


class LockLost(BitrayError):
    """The lease was lost."""


@dataclass(frozen=True)
class _Where:
    output: str
    state_dir: str
    storage: StorageConfig


def open_lock(lock_uri: str, run_id: str, *, storage: StorageConfig, ttl_s: float = 120.0) -> RunLock:
    state_dir = lock_uri.rsplit("/", 1)[0]
    return RunLock(_Where(state_dir.rsplit("/", 1)[0], state_dir, storage), run_id, ttl_s)


class LockHeld(BitrayError):
    """Another run holds the output's lock."""


class RunLock:
    """Exclusive right to run over one output prefix; a context manager. See the module docstring."""

    def __init__(self, layout, run_id: str, ttl_s: float = 120.0) -> None:  # noqa: ANN001
        self.layout = layout
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.uri = storage.join(layout.state_dir, "lock")
        self.owner = f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"
        self.token = uuid.uuid4().hex  # tells this holder's lease from any other
        self._scheme = storage.scheme_of(layout.output)
        self._fd: int | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def info(self) -> dict[str, Any]:
        now = time.time()
        return {
            "owner": self.owner,
            "run_id": self.run_id,
            "token": self.token,
            "heartbeat_at": now,
            "expires_at": now + self.ttl_s,
        }

    def __enter__(self) -> RunLock:
        if self._scheme == "file":
            self._acquire_local()
        else:
            self._acquire_lease()
            self._thread = threading.Thread(target=self._heartbeat, name="bitray-lock-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- local: flock --------------------------------------------------------------------------------------

    def _acquire_local(self) -> None:
        import fcntl

        path = storage.local_path(self.uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 65536, 0))
            os.close(fd)
            raise LockHeld(self._held_message(holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.info()).encode(), 0)
        self._fd = fd

    # -- object stores: a lease ----------------------------------------------------------------------------

    def _acquire_lease(self) -> None:
        current = self._read_lease()
        if current is None:
            if self._put(if_none_match=True):
                return
            current = self._read_lease()  # someone created it between our read and write
            if current is None:
                raise LockHeld(self._held_message("another run (it released the lock while we looked)"))
        body, etag = current
        same_run = body.get("run_id") == self.run_id
        if body.get("expires_at", 0) < time.time() or same_run:
            if same_run:
                log.warning(
                    "taking over the lock of run %s from %s (same run id)", self.run_id, body.get("owner")
                )
            if self._put(if_match=etag):
                return
        raise LockHeld(self._held_message(_describe(json.dumps(body).encode())))

    def _read_lease(self) -> tuple[dict[str, Any], str | None] | None:
        if self._scheme == "s3":
            from botocore.exceptions import ClientError

            client = storage.s3_client(self.layout.storage)
            bucket, key = storage.split_bucket(self.uri)
            with storage.s3_errors(self.uri, self.layout.storage):
                try:
                    obj = client.get_object(Bucket=bucket, Key=key)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code", "") in ("NoSuchKey", "404"):
                        return None
                    raise
                return json.loads(obj["Body"].read()), obj["ETag"]
        if not storage.exists(self.uri, self.layout.storage):
            return None
        return json.loads(storage.read_bytes(self.uri, self.layout.storage)), None

    def _put(self, *, if_none_match: bool = False, if_match: str | None = None) -> bool:
        """Write the lease; False when the condition failed (someone else holds or just took it)."""
        body = json.dumps(self.info()).encode()
        if self._scheme != "s3":  # best effort: no conditional writes through pyarrow
            storage.write_bytes(self.uri, body, self.layout.storage)
            return True
        from botocore.exceptions import ClientError

        client = storage.s3_client(self.layout.storage)
        bucket, key = storage.split_bucket(self.uri)
        kwargs: dict[str, Any] = {
            "Bucket": bucket,
            "Key": key,
            "Body": body,
            "ContentType": "application/json",
        }
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match:
            kwargs["IfMatch"] = if_match
        with storage.s3_errors(self.uri, self.layout.storage):
            try:
                self._etag = client.put_object(**kwargs)["ETag"]
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409", "NoSuchKey"):
                    return False
                raise
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                ok = self._put(if_match=self._etag)
            except Exception as exc:  # a transient network error: try again at the next beat
                log.warning("could not renew the lock %s: %s", self.uri, exc)
                continue
            if not ok:
                self.lost = True
                log.error("lost the lock %s to another run; stop this run and check the output", self.uri)
                return

    def check(self) -> None:
        if self.lost:
            raise LockLost(f"lost the lock {self.uri}")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays (deleting it would race)
            self._fd = None
            return
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        if self.lost:
            return
        try:
            self._delete_lease()
        except Exception as exc:  # the lease then simply expires
            log.warning("could not release the lock %s (%s); it expires in %.0f s", self.uri, exc, self.ttl_s)

    def _delete_lease(self) -> None:
        """Delete the lease if it is still ours: a conditional delete where S3 supports it, else a check."""
        if self._scheme == "s3":
            from botocore.exceptions import ClientError

            client = storage.s3_client(self.layout.storage)
            bucket, key = storage.split_bucket(self.uri)
            try:
                client.delete_object(Bucket=bucket, Key=key, IfMatch=self._etag)
                return
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code", "") in (
                    "PreconditionFailed",
                    "412",
                    "NoSuchKey",
                ):
                    return  # someone else's lease by now: not ours to delete
                # an endpoint without conditional deletes: check the holder, then delete
        current = self._read_lease()
        if current is not None and current[0].get("token") == self.token:
            storage.delete(self.uri, self.layout.storage)

    def _held_message(self, holder: str) -> str:
        return (
            f"another bitray run is working on {self.layout.output}: {holder}. Wait for it to finish "
            "(or, if it crashed on another machine, for its lock to expire) and run again"
        )


def _describe(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return "an unknown holder"
    left = body.get("expires_at", 0) - time.time()
    expiry = f", lock expires in {left:.0f} s unless renewed" if left > 0 else ", lock expired"
    return f"run {body.get('run_id')} by {body.get('owner')}{expiry}"
