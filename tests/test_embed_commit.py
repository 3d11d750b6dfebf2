"""The commit protocol and the driver's state without Ray: staged files, the write-ahead log, roll forward,
duplicate receipts, checkpoints, a lost lock; streamed manifests; incremental state and its compaction."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embed_fixtures import snapshot, write_photos

from bitray.config import EmbedConfig, StorageConfig
from bitray.embed import commit as commit_module
from bitray.embed import dry_run_embedding
from bitray.embed import manifest as manifest_module
from bitray.embed import state as state_module
from bitray.embed.commit import CommitLog, MultipartPublisher, Receipt, RenamePublisher, RunCommitter
from bitray.embed.layout import OutputLayout
from bitray.embed.manifest import listed_inputs, read_part
from bitray.embed.plan import start_run
from bitray.embed.state import IncrementalState, record_run
from bitray.locks import LockLost

RUN = "r1"


class Unfenced:
    """A lock that is always held (the fencing itself is tested in test_locks.py and, with real leases
    and two drivers, in test_embed_lease.py)."""

    lost = False

    def check(self) -> None:
        if self.lost:
            raise LockLost("lost the lock")

    def deadline(self) -> float:
        self.check()
        return math.inf


def staged_receipt(publisher, rows: tuple[int, int], errors: bool = False) -> Receipt:  # noqa: ANN001
    table = pa.table({"path": [f"p{i}" for i in range(*rows)]})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    data = buffer.getvalue().to_pybytes()
    files = [publisher.stage("embeddings", RUN, data)]
    if errors:
        files.append(publisher.stage("errors", RUN, data))
    count = rows[1] - rows[0]
    return Receipt(files=files, ranges=[rows], embedded=count, errored=0, model="m")


def visible(layout: OutputLayout) -> list[str]:
    return (
        sorted(p.name for p in Path(layout.output, "embeddings").glob("*"))
        if Path(layout.output).exists()
        else []
    )


def test_logged_but_unpublished_receipt_is_rolled_forward(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"), StorageConfig())
    publisher = RenamePublisher(layout)
    receipt = staged_receipt(publisher, (0, 4), errors=True)
    assert visible(layout) == []  # staged files are under _bitray, where no reader looks
    CommitLog(layout, RUN).append([receipt])  # the driver died right after its commit point

    committer = RunCommitter(layout, RUN, Unfenced())
    assert list(committer.committed) == [(0, 4)] and committer.embedded == 4
    assert all(Path(f.final).exists() and not Path(f.staged).exists() for f in receipt.files)
    logs = sorted(os.listdir(layout.log_dir(RUN)))
    assert logs == ["00000001.json", "00000002.json"]  # the segment, then a checkpoint folding it
    assert "checkpoint" in json.loads((Path(layout.log_dir(RUN)) / logs[1]).read_text())
    again = RunCommitter(layout, RUN, Unfenced())  # rolling forward twice changes nothing
    assert (list(again.committed), again.embedded, again.files) == ([(0, 4)], 4, 2)


def test_receipt_whose_staged_data_vanished_is_redone(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"), StorageConfig())
    receipt = staged_receipt(RenamePublisher(layout), (0, 4))
    CommitLog(layout, RUN).append([receipt])
    Path(receipt.files[0].staged).unlink()
    committer = RunCommitter(layout, RUN, Unfenced())
    assert list(committer.committed.missing(4)) == [(0, 4)] and visible(layout) == []


def test_duplicate_receipt_is_aborted_and_its_rows_stay_pending_on_s3(s3_server, s3_bucket):
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    layout = OutputLayout(f"s3://{s3_bucket}/out", StorageConfig())
    publisher = MultipartPublisher(layout)
    committer = RunCommitter(layout, RUN, Unfenced())
    first = staged_receipt(publisher, (0, 4))
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="out/embeddings/").get("KeyCount", 0)
    assert listed == 0  # an uncompleted upload is invisible
    assert committer.offer(first)
    second = staged_receipt(publisher, (2, 6))  # Ray re-ran a task: rows 2-3 again, with 4-5
    assert not committer.offer(second)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/embeddings/")["Contents"]]
    assert keys == [first.files[0].final.removeprefix(f"s3://{s3_bucket}/")]
    assert not client.list_multipart_uploads(Bucket=s3_bucket, Prefix="out/").get("Uploads")
    assert list(committer.committed.missing(6)) == [(4, 6)]  # another pass redoes them

    leftover = staged_receipt(publisher, (4, 6))  # a writer whose receipt never arrived (driver died)
    committer.finish()
    assert not client.list_multipart_uploads(Bucket=s3_bucket, Prefix="out/").get("Uploads")
    assert not [k for k in keys if leftover.files[0].final.endswith(k)]


def test_checkpoints_bound_what_a_resume_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(commit_module, "CHECKPOINT_EVERY", 3)
    monkeypatch.setattr(commit_module, "READ_AHEAD", 2)
    layout = OutputLayout(str(tmp_path / "out"), StorageConfig())
    publisher = RenamePublisher(layout)
    committer = RunCommitter(layout, RUN, Unfenced())
    for i in range(7):
        assert committer.offer(staged_receipt(publisher, (10 * i, 10 * i + 10)))
    assert len(os.listdir(layout.log_dir(RUN))) == 9  # 7 segments, 2 checkpoints: nothing is deleted
    reads = []
    read_object = CommitLog._read_object
    monkeypatch.setattr(
        CommitLog, "_read_object", lambda self, seq: reads.append(seq) or read_object(self, seq)
    )
    resumed = RunCommitter(layout, RUN, Unfenced())
    assert sorted(reads) == [8, 9]  # from the newest object down to the newest checkpoint
    assert list(resumed.committed) == [(0, 70)] and (resumed.embedded, resumed.files) == (70, 7)
    assert len(visible(layout)) == 7


def test_a_run_that_lost_its_lock_commits_nothing_more(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"), StorageConfig())
    publisher = RenamePublisher(layout)
    lock = Unfenced()
    committer = RunCommitter(layout, RUN, lock)
    assert committer.offer(staged_receipt(publisher, (0, 4)))
    lock.lost = True
    with pytest.raises(LockLost, match="lost the lock"):
        committer.offer(staged_receipt(publisher, (4, 8)))
    assert len(visible(layout)) == 1 and len(os.listdir(layout.log_dir(RUN))) == 1


# -- manifests and incremental state ---------------------------------------------------------------------


def test_inputs_merge_in_order_without_duplicates_into_numbered_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_module, "PART_ROWS", 4)
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 2)
    (tmp_path / "a").mkdir()
    for name in ("a/b.jpg", "a-c.jpg", "a/d/e.jpg", "z.jpg", "m.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    config = EmbedConfig(inputs=[str(tmp_path / "a"), str(tmp_path), str(tmp_path / "z.jpg")])
    uris = [o.uri for o in listed_inputs(config, StorageConfig())]
    assert uris == sorted({str(tmp_path / n) for n in ("a/b.jpg", "a-c.jpg", "a/d/e.jpg", "z.jpg", "m.jpg")})

    layout = OutputLayout(str(tmp_path / "out"), StorageConfig())
    params = start_run(config, layout, RUN, IncrementalState())
    assert [(p.first_row, p.rows) for p in params.manifest] == [(0, 4), (4, 1)]
    rows = []
    for part in params.manifest:
        rows += read_part(f"{layout.manifest_dir(RUN)}/{part.name}", layout.storage).to_pylist()
    assert [r["row"] for r in rows] == list(range(5)) and [r["path"] for r in rows] == uris


def test_incremental_state_streams_diffs_and_compacts(tmp_path, monkeypatch):
    """Twelve runs: each sees only what is new or changed; the state stays a base plus at most 3 deltas."""
    monkeypatch.setattr(state_module, "MAX_DELTAS", 3)
    src, out = tmp_path / "in", tmp_path / "out"
    config = EmbedConfig(inputs=[str(src)], output=str(out), incremental=True)
    layout = OutputLayout(str(out), StorageConfig())
    photos = write_photos(src, 2)
    total = 2
    for i in range(12):
        state = IncrementalState.load(layout)
        params = start_run(config, layout, f"r{i:02d}", state)
        if i == 0:
            assert (params.counts.new, params.counts.unchanged) == (2, 0)
        else:
            assert (params.counts.new, params.counts.changed, params.counts.unchanged) == (1, 1, total - 2)
        record_run(layout, state, params)  # as the driver does once every row is committed
        state = IncrementalState.load(layout)
        assert len(state.deltas) <= 3 and state.finished[-1] == f"r{i:02d}"
        write_photos(src, 1, seed=100 + i)  # one new object
        total += 1
        photos[0].write_bytes(photos[0].read_bytes() + b"\0")  # and one changed object
        os.utime(photos[0], ns=(time.time_ns(), time.time_ns() + i))
    state = IncrementalState.load(layout)
    assert state.generation >= 2
    bases = sorted(p.name for p in (out / "_bitray" / "state").iterdir() if p.name.startswith("base-"))
    assert bases == [f"base-{state.generation:06d}"]  # older bases were deleted
    before = snapshot(out)
    plan = dry_run_embedding(config)  # the next window, checked without writing anything
    assert (plan.counts.new, plan.counts.changed, plan.counts.unchanged) == (1, 1, total - 2)
    assert plan.files == 1 and plan.unfinished_runs == [] and plan.refused is None
    assert snapshot(out) == before


def test_dry_run_of_a_plain_run_into_a_used_output_says_it_would_be_refused(tmp_path, capsys):
    from bitray.cli import main

    src, out = tmp_path / "in", tmp_path / "out"
    write_photos(src, 3)
    config = EmbedConfig(inputs=[str(src)], output=str(out), model="random:tiny")
    layout = OutputLayout(str(out), StorageConfig())
    record_run(layout, IncrementalState(), start_run(config, layout, RUN, IncrementalState()))
    before = snapshot(out)
    assert (
        main(["embed", "--input", str(src), "--output", str(out), "--model", "random:tiny", "--dry-run"]) == 0
    )
    printed = capsys.readouterr().out
    assert "would be refused" in printed and "1024-d" in printed
    report = json.loads(printed.strip().splitlines()[-1])
    assert report["counts"]["listed"] == 3 and report["estimated_bytes"] == 3 * (4 * 1024 + 200)
    assert snapshot(out) == before


def test_work_items_cover_exactly_the_pending_rows():
    """Randomised: however the parts and the committed ranges fall, items hold each pending row once."""
    import random

    from bitray.embed.params import ManifestPart, RunParams
    from bitray.embed.pipeline import work_items
    from bitray.embed.ranges import RowRanges

    rng = random.Random(0)
    for _ in range(300):
        parts, first = [], 0
        for i in range(rng.randint(1, 6)):
            rows = rng.randint(1, 20)
            parts.append(ManifestPart(name=f"p{i}", first_row=first, rows=rows))
            first += rows
        committed = RowRanges()
        for _ in range(rng.randint(0, 5)):
            start = rng.randint(0, first)
            committed.add(start, rng.randint(start, first))
        pending = list(committed.missing(first))
        params = RunParams.model_construct(manifest=parts)
        size = rng.randint(1, 7)
        offsets = {p.name: p.first_row for p in parts}
        rows = []
        for item in work_items(params, pending, size):
            assert 0 < item["stop"] - item["start"] <= size
            rows += [offsets[item["part"]] + r for r in range(item["start"], item["stop"])]
        assert rows == [r for start, stop in pending for r in range(start, stop)]
