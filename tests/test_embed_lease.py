"""Two drivers on one output: a driver that lost its lease never deletes or overwrites what the other owns.

Against the real moto S3 server, with real leases of a few seconds (no lock is faked here): the takeover
scenario end to end (a SIGSTOPped driver, real Ray), and the commit layer's guarantees one by one: the
log's exclusive segment names, a commit request that cannot outlive the fence, a logged receipt rolled
forward instead of discarded, a discard refused once the lease is lost, cleanup by exact run id.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embed_fixtures import read_output, tiny_config, write_photos

from bitray import storage
from bitray.config import StorageConfig
from bitray.embed import fence, pipeline
from bitray.embed import run as run_module
from bitray.embed.commit import (
    CommitLog,
    LogConflict,
    MultipartPublisher,
    Receipt,
    RunCommitter,
    publisher_for,
)
from bitray.embed.fence import Fence
from bitray.embed.layout import OutputLayout, output_layout
from bitray.embed.manifest import read_part
from bitray.embed.write import write_files
from bitray.errors import BitrayError
from bitray.locks import FileLock, LeaseLock, LockLost, open_lock

pytest_plugins = ["fault_proxy"]

TTL = 3.0


def s3(endpoint: str):  # noqa: ANN201
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def keys(client, bucket: str, prefix: str) -> dict[str, str]:  # noqa: ANN001
    """Every object under ``prefix`` with its ETag."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def lease(bucket: str, run_id: str, ttl_s: float = TTL, config: StorageConfig | None = None) -> LeaseLock:
    lock = open_lock(
        f"s3://{bucket}/out/_bitray/lock", run_id, storage=config or StorageConfig(), ttl_s=ttl_s
    )
    assert isinstance(lock, LeaseLock)
    return lock


def stop_renewing(lock: LeaseLock) -> None:
    """The holder's renewal thread stops (its network is gone): the lease lapses after its TTL."""
    lock._stop.set()
    if lock._thread is not None:
        lock._thread.join()


def staged(publisher, run_id: str, rows: tuple[int, int]) -> Receipt:  # noqa: ANN001
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"path": [f"p{i}" for i in range(*rows)]}), buffer)
    files = [publisher.stage("embeddings", run_id, buffer.getvalue().to_pybytes())]
    return Receipt(files=files, ranges=[rows], embedded=rows[1] - rows[0], errored=0, model="m")


# -- the scenario end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_driver_that_lost_its_lease_touches_nothing_of_the_takers_run(
    s3_server, s3_bucket, ray_local, fault_proxy, tmp_path
):
    """A plans run ``nightly``, starts embedding and freezes (SIGSTOP: no renewal, no commit); B takes the
    lease over with --incremental, resumes ``nightly`` and publishes; A wakes up and offers a receipt. A
    stops with "lost the lock" and touches nothing; B finishes; every input is in the output exactly once."""
    client = s3(s3_server)
    photos = write_photos(tmp_path / "in", 24)
    for path in photos:
        client.put_object(Bucket=s3_bucket, Key=f"in/{path.name}", Body=path.read_bytes())
    src, out = f"s3://{s3_bucket}/in/", f"s3://{s3_bucket}/out"
    settings = tmp_path / "embed.yaml"
    settings.write_text(f"lock_ttl_s: {TTL}\n")
    command = [sys.executable, "-m", "bitray", "embed", "--input", src, "--output", out,
               "--model", "random:tiny", "--image-size", "32", "--batch-size", "2", "--rows-per-file", "4",
               "--actors", "1", "--run-id", "nightly", "--address", "local",
               "--config", str(settings)]  # fmt: skip
    reads_by_a: list[str] = []  # A reaches S3 through the proxy, which notes its GETs (and changes nothing)
    fault_proxy.set_faults(rate=1.0, kinds=("delay",), methods=("GET",),
                           match=lambda method, path: reads_by_a.append(path) and False)  # fmt: skip
    log_a = tmp_path / "a.log"
    with open(log_a, "wb") as sink:
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": fault_proxy.url}
        a = subprocess.Popen(command, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT, env=env)
    b_result: list[object] = []
    try:
        # A's decode tasks read the first image: its run is planned and its pipeline running, while its
        # model actor is still starting (seconds of TensorFlow import), so nothing is committed yet
        wait_for(lambda: any("/in/" in p for p in reads_by_a) or a.poll() is not None, 180, "A's pipeline")
        os.kill(a.pid, signal.SIGSTOP)  # A's driver freezes: no renewal, no commit
        assert a.poll() is None, log_a.read_text()[-3000:]
        assert not keys(client, s3_bucket, "out/embeddings/"), "A committed before it froze"

        def run_b() -> None:
            config = tiny_config([src], out, incremental=True, lock_ttl_s=TTL, batch_size=2, rows_per_file=4)
            try:
                b_result.append(run_module.run_embedding(config))
            except Exception as exc:  # reported by the main thread
                b_result.append(exc)

        b = threading.Thread(target=run_b)
        b.start()
        wait_for(
            lambda: keys(client, s3_bucket, "out/embeddings/") or not b.is_alive(), 180, "B's first file"
        )
        os.kill(a.pid, signal.SIGCONT)  # A wakes up: its pipeline goes on and offers receipts
        a.wait(timeout=300)
        b.join(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(a.pid, signal.SIGCONT)
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
        a.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(a.pid, signal.SIGKILL)  # whatever of A's own Ray is left

    said = log_a.read_text()
    assert a.returncode != 0 and "lost the lock" in said, said[-3000:]
    assert "nothing of run nightly was kept" not in said  # A did not discard the run
    assert len(b_result) == 1 and not isinstance(b_result[0], Exception), b_result
    run_state = keys(client, s3_bucket, "out/_bitray/runs/nightly/")
    for name in ("run.json", "summary.json", "manifest/part-00000.parquet"):
        assert f"out/_bitray/runs/nightly/{name}" in run_state, sorted(run_state)
    summary_key = "out/_bitray/runs/nightly/summary.json"
    summary = json.loads(client.get_object(Bucket=s3_bucket, Key=summary_key)["Body"].read())
    assert (summary["inputs"], summary["embedded"] + summary["errored"]) == (24, 24)
    fs = storage.s3_filesystem(StorageConfig())
    emb, err = read_output(f"{s3_bucket}/out", fs)
    assert sorted([*emb.path, *err.path]) == sorted(f"{src}{p.name}" for p in photos)  # each exactly once
    published = keys(client, s3_bucket, "out/embeddings/")
    again = run_module.run_embedding(tiny_config([src], out, incremental=True, lock_ttl_s=TTL))
    assert (again.inputs, again.unchanged) == (0, 24)  # the state records every input once
    assert keys(client, s3_bucket, "out/embeddings/") == published


def wait_for(condition, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- the commit layer's guarantees, one by one -----------------------------------------------------------


def test_a_lost_lease_refuses_the_discard_and_deletes_nothing(s3_server, s3_bucket):
    client = s3(s3_server)
    layout = OutputLayout(f"s3://{s3_bucket}/out", StorageConfig())
    for name in ("run.json", "manifest/part-00000.parquet"):
        client.put_object(Bucket=s3_bucket, Key=f"out/_bitray/runs/nightly/{name}", Body=b"{}")
    upload = staged(MultipartPublisher(layout), "nightly", (0, 4))
    a = lease(s3_bucket, "nightly", ttl_s=1.0)
    a.acquire()
    stop_renewing(a)
    with lease(s3_bucket, "nightly", ttl_s=1.0):  # B waits out A's silence and takes over
        before = keys(client, s3_bucket, "out/")
        with pytest.raises(LockLost, match="lost the lock"):
            run_module._discard(layout, "nightly", Fence(a))
        assert keys(client, s3_bucket, "out/") == before
        pending = client.list_multipart_uploads(Bucket=s3_bucket, Prefix="out/").get("Uploads", [])
        assert [u["UploadId"] for u in pending] == [upload.files[0].upload_id]  # B's to publish or clean
    a.release()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_writers_never_overwrite_a_log_segment(where, s3_server, s3_bucket, tmp_path):
    """Both writers think the next sequence number is 1: the second create fails (If-None-Match: *, or a
    hard link locally) and the first writer's segment stays as it was."""
    output = str(tmp_path / "out") if where == "local" else f"s3://{s3_bucket}/out"
    layout = OutputLayout(output, StorageConfig())
    a, b = CommitLog(layout, "nightly"), CommitLog(layout, "nightly")
    publisher = publisher_for(layout)
    mine, theirs = staged(publisher, "nightly", (0, 4)), staged(publisher, "nightly", (0, 4))
    a.append([mine])
    with pytest.raises(LogConflict):
        b.append([theirs])
    _, logged = CommitLog(layout, "nightly").read()
    assert logged == [mine]
    segment = storage.join(layout.log_dir("nightly"), "00000001.json")
    data = storage.read_bytes(segment, layout.storage)
    assert storage.create_bytes(segment, data, layout.storage)  # a retried create of our own bytes: ours
    assert not storage.create_bytes(segment, data + b" ", layout.storage)


def test_a_writer_that_meets_another_writers_segment_rolls_it_forward_and_redecides(
    s3_server, s3_bucket, tmp_path
):
    """Any interleaving of two committers on one run leaves every row committed once: B, whose next
    sequence number A took, reads A's entry, publishes it, and aborts its own overlapping receipt."""
    client = s3(s3_server)
    layout = OutputLayout(f"s3://{s3_bucket}/out", StorageConfig())
    publisher = MultipartPublisher(layout)
    with (
        FileLock(str(tmp_path / "a.lock"), "nightly") as lock_a,
        FileLock(str(tmp_path / "b.lock"), "nightly") as lock_b,
    ):
        a = RunCommitter(layout, "nightly", lock_a, fresh=True)
        b = RunCommitter(layout, "nightly", lock_b, fresh=True)
        first = staged(publisher, "nightly", (0, 4))
        CommitLog(layout, "nightly").append([first])  # A logged, then stopped before publishing
        assert not b.offer(staged(publisher, "nightly", (2, 6)))  # overlaps A's logged rows: aborted
        assert b.offer(staged(publisher, "nightly", (4, 8)))
        assert list(b.committed) == [(0, 8)] and b.embedded == 8
        assert not a.offer(staged(publisher, "nightly", (6, 10)))  # A catches up in turn
    visible = keys(client, s3_bucket, "out/embeddings/")
    assert f"out/embeddings/{first.files[0].final.rsplit('/', 1)[1]}" in visible and len(visible) == 2
    resumed = RunCommitter(layout, "nightly", FileLock(str(tmp_path / "c.lock"), "nightly").__enter__())
    assert list(resumed.committed) == [(0, 8)] and (resumed.embedded, resumed.files) == (8, 2)


def test_a_commit_request_never_outlives_the_fence(s3_server, s3_bucket, fault_proxy):
    """The store stalls on the log PUT (the network is gone for that request): each try ends by the
    lease's fence (ttl/2 after the last renewal), not after the shared client's minutes of retries."""
    config = StorageConfig(s3_endpoint=fault_proxy.url)
    layout = OutputLayout(f"s3://{s3_bucket}/out", config)
    with lease(s3_bucket, "nightly", ttl_s=2.0, config=config) as lock:
        committer = RunCommitter(layout, "nightly", lock, fresh=True)
        receipt = staged(MultipartPublisher(layout), "nightly", (0, 4))
        fault_proxy.set_faults(rate=1.0, kinds=("delay",), methods=("PUT",), delay_s=6.0,
                               match=lambda method, path: "/_bitray/runs/nightly/log/" in path)  # fmt: skip
        started = time.monotonic()
        with pytest.raises(BitrayError, match="deadline|lost the lock"):  # the latter if renewals stall too
            committer.offer(receipt)
        assert time.monotonic() - started < fence.TRIES * 1.0 + 0.5  # ttl/2 a try, not the 6 s stall
        fault_proxy.clear()
        assert committer.logged  # its PUT may land still: this run is rolled forward, never discarded


def test_a_logged_receipt_is_rolled_forward_never_discarded(tmp_path, monkeypatch):
    """The first receipt holds an embeddings and an errors file; publishing the errors file fails after the
    receipt was logged. The run is kept (not discarded with one file published and orphaned), and the
    rerun publishes the other file: every input exactly once."""
    photos = write_photos(tmp_path / "in", 6)
    out = tmp_path / "out"
    (out / "errors").parent.mkdir(parents=True)
    (out / "errors").write_text("in the way")  # errors/ cannot be created: the errors file cannot publish

    def fake_pipeline(layout, params, committer, pending, address) -> int:  # noqa: ANN001
        """The writer stage on the pending manifest rows, the first row an error, without Ray or a model."""
        rows = read_part(
            storage.join(layout.manifest_dir(params.run_id), "part-00000.parquet"), layout.storage
        )
        rows = rows.filter(
            pa.array([any(a <= r < b for a, b in pending) for r in rows.column("row").to_pylist()])
        )
        n = rows.num_rows
        block = rows.append_column("width", pa.array([40] * n, pa.int32())).append_column(
            "height", pa.array([40] * n, pa.int32())
        )
        failed = [r == 0 for r in rows.column("row").to_pylist()]
        block = (
            block.append_column(
                "embedding", pa.FixedSizeListArray.from_arrays(pa.array([0.5] * 2 * n, pa.float32()), 2)
            )
            .append_column("model", pa.array(["m@test"] * n))
            .append_column("stage", pa.array(["decode" if f else None for f in failed], pa.string()))
            .append_column("error", pa.array(["ValueError: bad" if f else None for f in failed], pa.string()))
        )
        receipt = Receipt.model_validate_json(
            write_files(block, layout=layout, run_id=params.run_id)["receipt"][0].as_py()
        )
        return receipt.embedded + receipt.errored if committer.offer(receipt) else 0

    monkeypatch.setattr(pipeline, "run_pipeline", fake_pipeline)
    config = tiny_config([str(tmp_path / "in")], str(out), run_id="nightly", rows_per_file=100)
    with pytest.raises(BitrayError, match="finish the run with --run-id nightly"):
        run_module.run_embedding(config)
    layout = output_layout(config)
    assert layout.is_begun("nightly") and len(list((out / "embeddings").iterdir())) == 1  # kept, not orphaned
    (out / "errors").unlink()  # fixed
    summary = run_module.run_embedding(config)
    assert (summary.inputs, summary.embedded, summary.errored, summary.processed) == (6, 5, 1, 0)
    emb, err = read_output(out)
    assert sorted([*emb.path, *err.path]) == sorted(str(p) for p in photos) and list(err.path) == [
        str(photos[0])
    ]


def test_cleanup_matches_the_run_id_exactly(s3_server, s3_bucket, tmp_path):
    """Cleaning up run ``nightly`` aborts its own staged uploads, never those of run ``nightly-2``."""
    client = s3(s3_server)
    layout = OutputLayout(f"s3://{s3_bucket}/out", StorageConfig())
    publisher = MultipartPublisher(layout)
    ours, theirs = staged(publisher, "nightly", (0, 4)), staged(publisher, "nightly-2", (0, 4))
    with FileLock(str(tmp_path / "lock"), "nightly") as lock:
        publisher.cleanup("nightly", Fence(lock))
    pending = client.list_multipart_uploads(Bucket=s3_bucket, Prefix="out/").get("Uploads", [])
    assert [u["UploadId"] for u in pending] == [theirs.files[0].upload_id]
    assert ours.files[0].upload_id != theirs.files[0].upload_id
