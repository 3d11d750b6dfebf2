"""Exactly once under failure: a `bitray embed` process killed with SIGKILL mid-run, then run again.

While the first process runs, a second run over the same output is refused by the lock. After the kill,
the output holds only whole files and no path twice; the restarted run (same run id) redoes only the
shards that were not committed and ends with inputs = embedded + errored; running it once more changes
nothing. An embedding actor killed mid-run is retried by Ray without losing or duplicating a row.
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
from embed_fixtures import read_output, snapshot, tiny_config, write_photos

from bitray.cli import main
from bitray.embed import run_embedding

pytestmark = pytest.mark.slow

COUNT = 40
BATCH = 2


def commits(out: Path, run_id: str) -> list[Path]:
    return sorted((out / "_bitray" / "runs" / run_id / "commits").glob("*.json"))


def wait_for(condition, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def assert_no_duplicates(out: Path) -> tuple:
    emb, err = read_output(out)
    paths = [*emb.path, *err.path]
    assert len(paths) == len(set(paths)), "a path appears twice in the output"
    return emb, err


def test_driver_sigkill_then_restart_with_same_run_id(ray_local, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_photos(src, COUNT)
    command = [sys.executable, "-m", "bitray", "embed", "--input", str(src), "--output", str(out),
               "--model", "random:tiny", "--image-size", "32", "--batch-size", str(BATCH),
               "--actors", "1", "--run-id", "killed", "--address", "local"]  # fmt: skip
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(command, start_new_session=True, **quiet)
    try:
        wait_for(lambda: len(commits(out, "killed")) >= 3 or proc.poll() is not None, 240, "3 commits")
        assert proc.poll() is None, "the run ended before it could be killed; give it more work"

        # the lock: a second (incremental) run over the same output is refused while the first works
        code = main(
            ["embed", "--input", str(src), "--output", str(out), "--model", "random:tiny", "--incremental"]
        )
        assert code != 0
        assert "another bitray run is working on" in capsys.readouterr().err

        os.kill(proc.pid, signal.SIGKILL)  # the driver only: Ray's own processes clean up after it
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(3)  # give the dead driver's local Ray time to exit
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # and whatever of it is left

    done_before = {p.name: p.stat().st_mtime_ns for p in commits(out, "killed")}
    assert 0 < len(done_before) < COUNT // BATCH
    assert not (out / "_bitray" / "runs" / "killed" / "summary.json").exists()
    assert_no_duplicates(out)  # readable whole files only, nothing twice

    summary = run_embedding(tiny_config([str(src)], str(out), batch_size=BATCH, run_id="killed"))
    assert (summary.inputs, summary.embedded + summary.errored) == (COUNT, COUNT)
    assert summary.processed <= COUNT - 2 * len(done_before)  # committed shards were not redone
    for name, mtime in done_before.items():
        assert (out / "_bitray" / "runs" / "killed" / "commits" / name).stat().st_mtime_ns == mtime
    emb, _ = assert_no_duplicates(out)
    assert sorted(emb.path) == sorted(str(p) for p in src.iterdir())

    before = snapshot(out)
    run_embedding(tiny_config([str(src)], str(out), batch_size=BATCH, run_id="killed"))
    assert snapshot(out) == before


def test_actor_killed_mid_run(ray_local, tmp_path):
    """SIGKILL the embedding actor once it has committed a shard: Ray restarts it and retries its work."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_photos(src, COUNT)
    killed: list[int] = []

    def kill_actor() -> None:
        wait_for(lambda: len(commits(out, "actor")) >= 2, 240, "2 commits")
        for child in psutil.Process().children(recursive=True):
            try:
                if any("EmbedActor" in part for part in child.cmdline()):
                    child.kill()
                    killed.append(child.pid)
            except psutil.Error:
                continue

    killer = threading.Thread(target=kill_actor, daemon=True)
    killer.start()
    summary = run_embedding(tiny_config([str(src)], str(out), batch_size=BATCH, run_id="actor"))
    killer.join(timeout=5)
    assert killed, "no embedding actor was found to kill"
    assert (summary.inputs, summary.embedded, summary.errored) == (COUNT, COUNT, 0)
    emb, _ = assert_no_duplicates(out)
    assert len(emb) == COUNT
