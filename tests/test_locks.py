"""bitray.locks: the output lock fences a run that lost it, on real moto S3 and a real local file system.

TTLs of about a second keep each test to a few seconds; the protocol only ever compares durations on one
process's monotonic clock, so short TTLs exercise the same code paths as the default 120 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from bitray import storage
from bitray.config import StorageConfig
from bitray.locks import FileLock, LeaseLock, LockHeld, LockLost, open_lock

pytest_plugins = ["fault_proxy"]

TTL = 2.0


@pytest.fixture(autouse=True)
def atomic_conditional_writes(monkeypatch):
    """moto checks If-Match / If-None-Match and then writes, without a lock between the two, so two
    racing conditional PUTs could both pass its check; real S3 (and GCS) decide them atomically. Make the
    emulator as atomic as the real thing for these tests."""
    from moto.s3.responses import S3Response

    guard = threading.Lock()
    for name in ("put_object", "delete_object"):
        original = getattr(S3Response, name)

        def atomic(self, _original=original):  # noqa: ANN001, ANN202
            with guard:
                return _original(self)

        monkeypatch.setattr(S3Response, name, atomic)


def _uri(bucket: str) -> str:
    return f"s3://{bucket}/out/_bitray/lock"


def _lease(endpoint: str, bucket: str) -> dict | None:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    found = storage.get_with_etag(_uri(bucket), client=client)
    return json.loads(found[0]) if found else None


def _lock(bucket: str, run_id: str, ttl_s: float = TTL, config: StorageConfig | None = None) -> LeaseLock:
    lock = open_lock(_uri(bucket), run_id, storage=config or StorageConfig(), ttl_s=ttl_s)
    assert isinstance(lock, LeaseLock)
    return lock


def test_a_live_lease_is_refused_naming_its_holder_and_released_after(s3_server, s3_bucket):
    with _lock(s3_bucket, "run-a") as holder:
        holder.check()
        started = time.monotonic()
        with pytest.raises(LockHeld, match=r"run run-a by .* pid \d+; it is alive .* Wait for it to finish"):
            _lock(s3_bucket, "run-b").acquire()
        assert time.monotonic() - started < TTL  # told at the holder's next renewal, not after a TTL
        holder.check()
    assert _lease(s3_server, s3_bucket) is None  # released by a conditional delete
    with _lock(s3_bucket, "run-b") as taker:
        taker.check()


def test_the_same_run_id_never_takes_over_a_live_lease(s3_server, s3_bucket):
    with _lock(s3_bucket, "run-a") as holder:
        with pytest.raises(LockHeld, match="run run-a"):
            _lock(s3_bucket, "run-a").acquire()
        time.sleep(TTL)  # renewals go on undisturbed
        holder.check()
        assert _lease(s3_server, s3_bucket)["token"] == holder.token


def test_forced_expiry_while_committing_stops_the_old_holder_before_the_takeover(
    s3_server, s3_bucket, monkeypatch
):
    holder = _lock(s3_bucket, "run-a")
    holder.acquire()
    commits: list[float] = []
    stopped: list[tuple[float, LockLost]] = []

    def commit_loop() -> None:  # the driver's committer: check() before each commit
        try:
            while True:
                holder.check()
                commits.append(time.monotonic())
                time.sleep(0.01)
        except LockLost as exc:
            stopped.append((time.monotonic(), exc))

    committer = threading.Thread(target=commit_loop)
    committer.start()
    monkeypatch.setattr(holder, "renew", lambda: False)  # the holder stalls: no renewal lands any more
    taker = _lock(s3_bucket, "run-b")
    taker.acquire()  # waits out a TTL of silence on its own clock, then takes over with If-Match
    taken_at = time.monotonic()
    committer.join(timeout=5)

    assert stopped, "the old holder never stopped committing"
    assert "over half its TTL" in str(stopped[0][1])
    assert commits and max(commits) < taken_at - TTL / 4  # stopped well before the takeover
    assert stopped[0][0] < taken_at
    monkeypatch.undo()  # the holder's network comes back: its next renewal finds the lease taken
    assert holder.renew() is False
    with pytest.raises(LockLost, match="lost the lock .* now held by run run-b"):
        holder.check()
    holder.release()  # must not delete the taker's lease
    assert _lease(s3_server, s3_bucket)["token"] == taker.token
    taker.check()
    taker.release()


def test_a_stalled_renewal_fences_and_a_later_success_restores(s3_bucket, monkeypatch):
    with _lock(s3_bucket, "run-a") as lock:
        monkeypatch.setattr(lock, "renew", lambda: False)
        time.sleep(TTL * 0.75)
        with pytest.raises(LockLost, match="last renewed"):
            lock.check()
        monkeypatch.undo()
        assert lock.renew() is True  # nobody took over: the same ETag is still there
        lock.check()


def test_a_renewal_whose_response_was_lost_is_retried_and_keeps_the_lease(s3_server, s3_bucket, fault_proxy):
    config = StorageConfig(s3_endpoint=fault_proxy.url)
    lock = _lock(s3_bucket, "run-a", ttl_s=20, config=config)  # renewals by hand, not by the heartbeat
    with lock:
        assert _lease(s3_server, s3_bucket)["seq"] == 1
        # the server performs the PUT, the client never hears back and retries it with the old If-Match
        fault_proxy.fail_next("drop", method="PUT", match=lambda method, path: path.endswith("/lock"))
        assert lock.renew() is True  # botocore's retry got 412; the re-read lease is ours at seq 2
        assert fault_proxy.injected["drop"] == 1
        assert fault_proxy.seen["PUT"] == 3  # create, the dropped renewal, its retry (412)
        lease = _lease(s3_server, s3_bucket)
        assert (lease["token"], lease["seq"]) == (lock.token, 2)
        lock.check()
        assert lock.renew() is True  # the adopted ETag is the real one: the next renewal lands
        assert _lease(s3_server, s3_bucket)["seq"] == 3
    assert _lease(s3_server, s3_bucket) is None


def test_two_takers_racing_on_a_stale_lease_exactly_one_wins(s3_server, s3_bucket):
    dead = {"run_id": "run-dead", "owner": "nobody", "token": "dead", "seq": 7, "ttl_s": TTL}
    bucket_key = _uri(s3_bucket).split("/", 3)
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").put_object(
        Bucket=bucket_key[2], Key=bucket_key[3], Body=json.dumps(dead).encode()
    )
    takers = [_lock(s3_bucket, "run-b"), _lock(s3_bucket, "run-c")]
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def take(lock: LeaseLock) -> None:
        barrier.wait()
        try:
            lock.acquire()
            outcomes[lock.run_id] = "won"
        except LockHeld as exc:
            outcomes[lock.run_id] = exc

    threads = [threading.Thread(target=take, args=(lock,)) for lock in takers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    winners = [run for run, outcome in outcomes.items() if outcome == "won"]
    assert len(outcomes) == 2 and len(winners) == 1, outcomes
    winner = next(lock for lock in takers if lock.run_id == winners[0])
    assert _lease(s3_server, s3_bucket)["token"] == winner.token
    winner.check()
    winner.release()


def test_local_lock_is_released_by_the_kernel_when_its_holder_is_killed(tmp_path):
    path = tmp_path / "out" / "_bitray" / "lock"
    code = (
        "import sys, time\n"
        "from bitray.config import StorageConfig\n"
        "from bitray.locks import open_lock\n"
        "open_lock(sys.argv[1], 'run-a', storage=StorageConfig(), ttl_s=1).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline() == b"locked\n"
        lock = open_lock(str(path), "run-b", storage=StorageConfig(), ttl_s=1)
        assert isinstance(lock, FileLock)
        with pytest.raises(LockHeld, match=r"run run-a by .* pid \d+; wait for it to finish"):
            lock.acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
    with open_lock(str(path), "run-b", storage=StorageConfig(), ttl_s=1) as lock:
        lock.check()
        path.unlink()  # someone deleted the lock file under a live run: it no longer excludes anyone
        with pytest.raises(LockLost, match="deleted or replaced"):
            lock.check()


def test_a_lease_in_a_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(storage.BitrayError, match="bucket 'no-such-bucket' .* does not exist"):
        open_lock(
            "s3://no-such-bucket/out/_bitray/lock", "run-a", storage=StorageConfig(), ttl_s=TTL
        ).acquire()
