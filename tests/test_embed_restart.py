"""Exactly once under failure, with files of several model batches: a `bitray embed` driver killed with
SIGKILL mid-run (locally and on S3), then run again; an embedding actor killed mid-run.

While the first process runs, a second run over the same output is refused by the lock. After the kill,
readers see only whole, published files and no path twice; the restarted run (same run id) redoes only
rows that were not committed and ends with inputs = embedded + errored; running it once more changes
nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from embed_fixtures import published, read_output, snapshot, tiny_config, write_photos

from bitray.cli import main
from bitray.embed import run_embedding

pytestmark = pytest.mark.slow

COUNT = 96
BATCH = 2
ROWS_PER_FILE = 12  # six model batches per file, eight files


def wait_for(condition, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def assert_no_duplicates(out: str | Path, filesystem=None) -> tuple:  # noqa: ANN001
    emb, err = read_output(out, filesystem)
    paths = [*emb.path, *err.path]
    assert len(paths) == len(set(paths)), "a path appears twice in the output"
    return emb, err


def kill_mid_run(command: list[str], files_published, while_running=None) -> None:  # noqa: ANN001
    """Start ``bitray embed`` in a process of its own, SIGKILL it once it published two files.

    ``while_running`` is called once the first file is published, while the process still runs.
    """
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(command, start_new_session=True, **quiet)
    try:
        wait_for(lambda: files_published() >= 1 or proc.poll() is not None, 240, "a published file")
        if while_running is not None:
            assert proc.poll() is None, "the run ended too early; give it more work"
            while_running()
        wait_for(lambda: files_published() >= 2 or proc.poll() is not None, 240, "2 published files")
        assert proc.poll() is None, "the run ended before it could be killed; give it more work"
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: Ray's own processes clean up after it
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(3)  # give the dead driver's local Ray time to exit
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # and whatever of it is left


def embed_command(src: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bitray", "embed", "--input", src, "--output", out,
            "--model", "random:tiny", "--image-size", "64", "--batch-size", str(BATCH),
            "--rows-per-file", str(ROWS_PER_FILE),
            "--actors", "1", "--run-id", "killed", "--address", "local", *extra]  # fmt: skip


def test_driver_sigkill_then_restart_with_same_run_id(ray_local, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_photos(src, COUNT)

    def second_run_is_refused() -> None:  # while the first works, a second (incremental) run is refused
        command = ["embed", "--input", str(src), "--output", str(out), "--model", "random:tiny"]
        command.append("--incremental")
        code = main(command)
        captured = capsys.readouterr()
        assert code != 0, captured.out[-3000:]
        assert "killed" in captured.err  # the message names the run that holds the lock

    kill_mid_run(embed_command(str(src), str(out)), lambda: len(published(out)), second_run_is_refused)

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in published(out)}
    assert not (out / "_bitray" / "runs" / "killed" / "summary.json").exists()
    emb, err = assert_no_duplicates(out)  # readable whole files only, nothing twice
    assert 0 < len(emb) + len(err) < COUNT

    config = tiny_config([str(src)], str(out), batch_size=BATCH, rows_per_file=ROWS_PER_FILE, run_id="killed")
    summary = run_embedding(config)
    assert (summary.inputs, summary.embedded + summary.errored) == (COUNT, COUNT)
    assert summary.processed <= COUNT - (len(emb) + len(err))  # committed rows were not redone
    for name, stamp in before.items():
        assert (out / "embeddings" / name).stat().st_mtime_ns == stamp[0]
    emb, _ = assert_no_duplicates(out)
    assert sorted(emb.path) == sorted(str(p) for p in src.iterdir())
    assert not (out / "_bitray" / "runs" / "killed" / "staging").exists()  # stale staged files removed

    again = snapshot(out)
    run_embedding(config)
    assert snapshot(out) == again


def test_driver_sigkill_on_s3(s3_server, s3_bucket, ray_local, tmp_path):
    import boto3

    from bitray.config import StorageConfig
    from bitray.storage import s3_filesystem

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for path in write_photos(tmp_path / "in", COUNT):
        client.put_object(Bucket=s3_bucket, Key=f"in/{path.name}", Body=path.read_bytes())
    src, out = f"s3://{s3_bucket}/in/", f"s3://{s3_bucket}/out"

    def published_etags() -> dict[str, str]:
        listing = client.list_objects_v2(Bucket=s3_bucket, Prefix="out/embeddings/").get("Contents", [])
        return {o["Key"]: o["ETag"] for o in listing}

    settings = tmp_path / "embed.yaml"
    settings.write_text("lock_ttl_s: 3\n")  # the killed driver's lease lapses within seconds
    kill_mid_run(embed_command(src, out, "--config", str(settings)), lambda: len(published_etags()))
    before = published_etags()
    fs = s3_filesystem(StorageConfig())
    emb, err = assert_no_duplicates(f"{s3_bucket}/out", fs)
    assert 0 < len(emb) + len(err) < COUNT
    uploads = client.list_multipart_uploads(Bucket=s3_bucket, Prefix="out/").get("Uploads", [])

    config = tiny_config(
        [src], out, batch_size=BATCH, rows_per_file=ROWS_PER_FILE, run_id="killed", lock_ttl_s=3
    )
    summary = run_embedding(config)
    assert (summary.inputs, summary.embedded + summary.errored) == (COUNT, COUNT)
    assert summary.processed <= COUNT - (len(emb) + len(err))
    after = published_etags()
    assert all(after[key] == etag for key, etag in before.items())  # published files untouched
    emb, _ = assert_no_duplicates(f"{s3_bucket}/out", fs)
    assert sorted(emb.path) == sorted(f"{src}{p.name}" for p in (tmp_path / "in").iterdir())
    assert not client.list_multipart_uploads(Bucket=s3_bucket, Prefix="out/").get("Uploads", []), (
        f"stale uploads left (there were {len(uploads)} after the kill)"
    )


@pytest.mark.parametrize("where", ["local", "s3"])
def test_actor_killed_mid_run(where, ray_local, s3_server, tmp_path, request):
    """SIGKILL the embedding actor once a file is published: Ray restarts it and retries its work."""
    photos = write_photos(tmp_path / "in", COUNT)
    if where == "s3":
        import boto3

        bucket = request.getfixturevalue("s3_bucket")
        client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
        for path in photos:
            client.put_object(Bucket=bucket, Key=f"in/{path.name}", Body=path.read_bytes())
        src, out = f"s3://{bucket}/in/", f"s3://{bucket}/out"

        def published_files() -> int:
            return client.list_objects_v2(Bucket=bucket, Prefix="out/embeddings/").get("KeyCount", 0)

        from bitray.config import StorageConfig
        from bitray.storage import s3_filesystem

        reader = (f"{bucket}/out", s3_filesystem(StorageConfig()))
    else:
        src, out = str(tmp_path / "in"), str(tmp_path / "out")

        def published_files() -> int:
            return len(published(tmp_path / "out"))

        reader = (out, None)
    killed: list[int] = []

    def kill_actor() -> None:
        wait_for(lambda: published_files() >= 1, 240, "a published file")
        for child in psutil.Process().children(recursive=True):
            try:
                if any("EmbedActor" in part for part in child.cmdline()):
                    child.kill()
                    killed.append(child.pid)
            except psutil.Error:
                continue

    killer = threading.Thread(target=kill_actor, daemon=True)
    killer.start()
    config = tiny_config([src], out, batch_size=BATCH, rows_per_file=ROWS_PER_FILE, run_id="actor")
    summary = run_embedding(config)
    killer.join(timeout=5)
    assert killed, "no embedding actor was found to kill"
    assert (summary.inputs, summary.embedded, summary.errored) == (COUNT, COUNT, 0)
    emb, _ = assert_no_duplicates(*reader)
    assert len(emb) == COUNT
