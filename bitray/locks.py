"""The lock that serialises runs over one output, and fences a run that lost it.

``open_lock(uri, run_id, storage=..., ttl_s=...)`` chooses once, by the URI's scheme, between two classes
with one interface: a context manager whose ``check()`` raises ``LockLost`` when this run may no longer
commit. The committer calls ``check()`` right before each commit.

``FileLock`` (local output): ``fcntl.flock`` on the lock file. The kernel releases it when the process
dies, even by SIGKILL, so a crashed run never blocks the next one, and nobody can take it from a live
holder: ``check()`` only verifies the file was not deleted or replaced under it. Like any flock it holds
only among processes that see the same local file system (not between two machines on NFS).

``LeaseLock`` (``s3://``, ``gs://``): a lease object written only under preconditions
(``bitray.storage.conditional_object``). The body carries the holder's random token and a sequence number.

- Acquire: create with ``If-None-Match: *`` (GCS: ``if_generation_match=0``): one creator wins. A lease
  that exists is watched: its ETag changing means a live holder (``LockHeld`` at once, naming it); the
  same ETag unchanged for the holder's TTL *on the taker's own monotonic clock* means a dead one, and the
  taker replaces it with ``If-Match`` on that ETag, so of two racing takers exactly one wins. No wall
  clock of another machine is ever read, and a driver resuming the same run id is no exception: it too
  waits out the silence (a live lease is never taken over).
- Renew: a thread replaces the lease every ``ttl/4`` with ``If-Match`` on the last ETag and the next
  sequence number, through a client whose requests time out after about ``ttl/8``. A retried PUT whose
  first try did land (its response lost) gets 412: the lease is then re-read, and when it holds our token
  and our pending sequence number its ETag is adopted: the renewal succeeded. Any other body means the
  lease was taken over: the lock is lost for good.
- Fence: ``check()`` raises ``LockLost`` once the last successful renewal *started* more than ``ttl/2``
  ago on this process's monotonic clock, and ``deadline()`` is that instant. A taker starts counting no
  earlier than that renewal's write landed and waits a full TTL, so the holder stops committing at least
  ``ttl/2`` before anyone can take over. Commit-path requests are given ``deadline()`` as theirs (their
  timeouts end there, ``bitray.embed.fence``) and ``check()`` is called again after each, so the margin
  covers only a request's travel to the store after its client gave up and the two clocks' rate
  difference (not their offset). A renewal that succeeds later (the network came back, nobody took
  over) restores it.
- Release: a conditional delete on our last ETag, so a taker's lease is never deleted.

``gs://`` gets the same guarantees through generation preconditions when google-cloud-storage is
installed (``conditional_object`` refuses ``gs://`` leases without it rather than write unconditionally).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bitray import storage
from bitray.config import StorageConfig
from bitray.errors import BitrayError

log = logging.getLogger(__name__)


class LockHeld(BitrayError):
    """Another run holds the output's lock."""


class LockLost(BitrayError):
    """This run no longer holds its lock (taken over, or not renewed in time): it must stop committing."""


class Lock:
    """Exclusive right to run over one output; a context manager. ``check()`` before each commit."""

    uri: str
    run_id: str

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Raise ``LockLost`` unless this run may still commit."""
        raise NotImplementedError

    def deadline(self) -> float:
        """The ``time.monotonic()`` instant by which a commit-path request must have ended (the fence);
        ``math.inf`` when nobody can take the lock from a live holder. Raises ``LockLost`` when past."""
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError


def open_lock(lock_uri: str, run_id: str, *, storage: StorageConfig, ttl_s: float) -> Lock:
    """The lock for ``lock_uri``: a ``FileLock`` for a local path, a ``LeaseLock`` for ``s3://``/``gs://``.

    ``ttl_s``: how long a lease may go unrenewed before another run may take it over (leases only). The
    holder renews every ``ttl_s/4`` and stops committing (``check()`` raises) ``ttl_s/2`` after the last
    renewal that landed; a run that finds a crashed holder's lease waits ``ttl_s`` of silence first.

    ``gs://`` guarantees what ``s3://`` does, through GCS generation preconditions (atomic on Google's
    side) and google-cloud-storage; it cannot guarantee anything against a tool that overwrites the lease
    object unconditionally, and the local tests run it only against gcp-storage-emulator, which ignores
    preconditions: its fencing is verified on S3 (moto), its happy path on the emulator.

    Example::

        with open_lock(storage.join(output, "_bitray", "lock"), run_id, storage=cfg, ttl_s=120) as lock:
            for receipt in receipts:
                lock.check()
                commit(receipt)
    """
    if _scheme(lock_uri) == "file":
        return FileLock(lock_uri, run_id)
    return LeaseLock(lock_uri, run_id, storage=storage, ttl_s=ttl_s)


def _scheme(uri: str) -> str:
    return storage.scheme_of(uri)  # a function of its own: open_lock's ``storage`` argument hides the module


def _owner() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"


class FileLock(Lock):
    """``fcntl.flock`` on a local file; released by the kernel when the holder dies, even by SIGKILL."""

    def __init__(self, lock_uri: str, run_id: str) -> None:
        self.uri = lock_uri
        self.run_id = run_id
        self.path = storage.local_path(lock_uri)
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 65536, 0))
            os.close(fd)
            raise LockHeld(_held_message(self.uri, holder, "wait for it to finish and run again")) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"owner": _owner(), "run_id": self.run_id}).encode(), 0)
        self._fd = fd

    def check(self) -> None:
        if self._fd is None:
            raise LockLost(f"run {self.run_id} lost the lock {self.uri}: it does not hold it")
        try:
            same = os.fstat(self._fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            raise LockLost(
                f"run {self.run_id} lost the lock: the lock file {self.path} was deleted or replaced while "
                "it held it; another run may be working on the output: stop this one and check the output"
            )

    def deadline(self) -> float:
        self.check()
        return math.inf  # the kernel never takes a flock from a live holder

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays (deleting it would race)
            self._fd = None


class LeaseLock(Lock):
    """A renewed lease object on S3 or GCS; see the module docstring for the protocol and its argument."""

    def __init__(self, lock_uri: str, run_id: str, *, storage: StorageConfig, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise BitrayError(f"lock_ttl_s must be positive, got {ttl_s}")
        self.uri = lock_uri
        self.run_id = run_id
        self.ttl_s = float(ttl_s)
        self.owner = _owner()
        self.token = uuid.uuid4().hex
        self.config = storage
        self.object = _lease_object(lock_uri, storage, ttl_s)
        self.poll_s = max(0.05, self.ttl_s / 8)
        self._tag: str | None = None  # the ETag (GCS: generation) of our last confirmed write
        self._seq = 0  # sequence number of our last confirmed write
        self._pending: tuple[int, float] | None = None  # (seq, monotonic start of its first try)
        self._renewed_at = 0.0  # monotonic start of the last successful write
        self._lost: str | None = None
        self._guard = threading.Lock()  # one write at a time: the heartbeat and release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the interface --------------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease, waiting at most one TTL of the current holder to tell dead from alive."""
        errors = storage.s3_errors(self.uri, self.config) if _scheme(self.uri) == "s3" else None
        with errors or contextlib.nullcontext():
            self._acquire()

    def _acquire(self) -> None:
        watched: tuple[str, float] | None = None  # (tag, monotonic time first seen)
        while True:
            started = time.monotonic()
            current = self.object.read()
            if current is None:
                tag = self.object.create(self._body(1))
                if tag is not None:
                    return self._acquired(tag, 1, started)
                watched = None
                continue  # someone created it between our read and write: watch theirs
            raw, tag = current
            body = _parse(raw)
            if watched is not None and watched[0] != tag:
                raise LockHeld(_held_message(self.uri, _describe(raw), _what_to_do(body, self.ttl_s)))
            if watched is None:
                watched = (tag, time.monotonic())
            silence = time.monotonic() - watched[1]
            holder_ttl = max(self.ttl_s, float(body.get("ttl_s") or 0))
            if silence >= holder_ttl:
                log.warning(
                    "taking over the lock %s: %s did not renew it for %.1f s",
                    self.uri,
                    _describe(raw),
                    silence,
                )
                started = time.monotonic()
                new = self.object.replace(self._body(1), tag)
                if new is None:  # another taker won the race, or the holder came back
                    now = self.object.read()
                    holder = _describe(now[0]) if now else "another run (it has released it since)"
                    raise LockHeld(
                        _held_message(
                            self.uri, holder, "it took the lock over just now; wait for it to finish"
                        )
                    )
                return self._acquired(new, 1, started)
            time.sleep(min(self.poll_s, holder_ttl - silence))

    def check(self) -> None:
        if self._lost:
            raise LockLost(self._lost)
        if self._tag is None:
            raise LockLost(f"run {self.run_id} lost the lock {self.uri}: it does not hold it")
        age = time.monotonic() - self._renewed_at
        if age > self.ttl_s / 2:
            raise LockLost(
                f"run {self.run_id} lost the lock {self.uri}: it was last renewed {age:.1f} s ago, over "
                f"half its TTL ({self.ttl_s:g} s), so another run may take it over; this run stops and "
                "touches nothing more. Check the connection to the object store; the output's next run "
                "(--incremental, or --run-id to resume this one) finishes what is left"
            )

    def deadline(self) -> float:
        renewed_at = self._renewed_at  # read once: the heartbeat moves it
        self.check()
        return renewed_at + self.ttl_s / 2

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl_s)
            self._thread = None
        with self._guard:
            tag, self._tag = self._tag, None
            if tag is None or self._lost:
                return
            try:
                if not self.object.delete(tag):
                    current = self.object.read()  # a renewal whose response was lost may have landed
                    if current is None or _parse(current[0]).get("token") != self.token:
                        log.warning("the lock %s had changed when released; left it to its holder", self.uri)
                    elif not self.object.delete(current[1]):
                        log.warning(
                            "could not release the lock %s; it expires after %.0f s", self.uri, self.ttl_s
                        )
            except Exception as exc:  # the lease then expires after its TTL of silence
                log.warning(
                    "could not release the lock %s (%s); it expires after %.0f s", self.uri, exc, self.ttl_s
                )

    # -- renewal --------------------------------------------------------------------------------------------

    def renew(self) -> bool:
        """One renewal; True when it landed. Safe to call again after any failure (see the docstring)."""
        with self._guard:
            if self._lost or self._tag is None:
                return False
            if self._pending is None:
                self._pending = (self._seq + 1, time.monotonic())
            seq, started = self._pending
            new = self.object.replace(self._body(seq), self._tag)
            if new is not None:
                self._confirm(new, seq, started)
                return True
            current = self.object.read()  # 412: our own earlier try landed, or someone took over
            body = _parse(current[0]) if current else {}
            if current is not None and body.get("token") == self.token:
                if body.get("seq") == seq:
                    self._confirm(current[1], seq, started)
                    return True
                self._tag, self._seq = current[1], int(body.get("seq", self._seq))  # retry from there
                return False
            holder = _describe(current[0]) if current else "nobody (the lease was deleted)"
            self._lost = (
                f"run {self.run_id} lost the lock {self.uri}: it is now held by {holder}. This run stops "
                "and touches nothing more; check that no two schedulers run the same job"
            )
            log.error("%s", self._lost)
            return False

    def _confirm(self, tag: str, seq: int, started: float) -> None:
        self._tag, self._seq, self._pending = tag, seq, None
        self._renewed_at = started

    def _acquired(self, tag: str, seq: int, started: float) -> None:
        self._confirm(tag, seq, started)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="bitray-lock-renewal", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except Exception as exc:  # a timeout or 5xx: the next beat retries the same write
                log.warning("could not renew the lock %s: %s", self.uri, exc)
            if self._lost:
                return

    def _body(self, seq: int) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "run_id": self.run_id,
                "token": self.token,
                "seq": seq,
                "ttl_s": self.ttl_s,
                "written_at": time.time(),  # for people reading the lease; never compared
            }
        ).encode()


def _lease_object(uri: str, config: StorageConfig, ttl_s: float) -> storage.ConditionalObject:
    return storage.conditional_object(uri, config, timeout_s=min(5.0, max(0.5, ttl_s / 8)))


def _parse(raw: bytes) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        body = json.loads(raw)
        if isinstance(body, dict):
            return body
    return {}


def _describe(raw: bytes) -> str:
    body = _parse(raw)
    if not body:
        return "an unknown holder"
    return f"run {body.get('run_id')} by {body.get('owner')}"


def _what_to_do(body: dict[str, Any], ttl_s: float) -> str:
    ttl = max(ttl_s, float(body.get("ttl_s") or 0))
    return (
        "it is alive (it renewed its lease just now). Wait for it to finish; if it is stuck, stop it: its "
        f"lease is taken over {ttl:.0f} s after its last renewal"
    )


def _held_message(uri: str, holder: str, what_to_do: str) -> str:
    output = uri.rsplit("/_bitray/", 1)[0] if "/_bitray/" in uri else str(Path(uri).parent)
    return f"another bitray run is working on {output} (lock {uri}): {holder}; {what_to_do}"
