"""Exactly-once output: staged files, one committer (the driver), a write-ahead commit log.

The protocol, as Hadoop's S3A committers do it:

1. **Stage** (writer tasks): a file of ``rows_per_file`` rows is written where no reader looks. On S3 it
   is a multipart upload to its final key that is *not completed* (invisible to LIST and GET); locally and
   on GCS it is a file under ``_bitray/runs/<run>/staging/``. The writer returns a *receipt*: the staged
   files and the manifest row ranges they hold. Final names carry a fresh uid per attempt, so two attempts
   never write the same name.
2. **Decide** (driver, single-threaded): a receipt whose ranges overlap anything committed (Ray re-ran a
   task whose output it had lost) is aborted whole; its other rows stay pending for the next pass.
3. **Log** (the commit point): after checking the output's lock (``Lock.check``), the driver appends the
   receipt to the run's log with one PUT of ``log/<seq>.json``.
4. **Publish**: the driver completes the upload (S3) or moves the staged file to its final name (a rename
   locally, a server-side copy then delete on GCS). Each makes a whole file appear at once.

Every ``CHECKPOINT_EVERY`` segments, the log is folded into ``log/<seq>-full.json``: the committed row
ranges as a few intervals plus counts, after which older segments are deleted. Reading the log costs one
LIST and at most ``CHECKPOINT_EVERY + 1`` GETs, whatever the size of the run.

Why every failure point is safe:
- Killed before (3): nothing is logged; staged files are invisible and the rows pending. The rerun stages
  new files under new names; stale staged files are removed when the run finishes (``cleanup``).
- Killed between (3) and (4): the rerun reads the entry and publishes it (*roll forward*): completing or
  moving again is idempotent, and the rows are committed, never redone.
- Killed during (4) of an entry with an embeddings and an errors file: the rerun publishes the other.
- Killed while checkpointing: a checkpoint is one PUT; until it exists the segments it would replace are
  read, and after it exists they are ignored even if their deletes did not happen.
- Two drivers: the lock fences; a driver whose lease lapsed stops before its next log PUT.
- A staged file gone before it was published (an S3 lifecycle rule aborted the upload of a run resumed
  days later): the entry is dropped on roll forward and its rows are redone; nothing became visible.
Readers list ``embeddings/`` and ``errors/`` and see only published files, each written whole.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from bitray import storage
from bitray.embed.layout import DATA_KINDS, OutputLayout, part_name, read_json, write_json
from bitray.embed.ranges import Range, RowRanges
from bitray.errors import BitrayError

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 64


class StagedFile(BaseModel):
    """A written but unpublished data file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str  # embeddings | errors
    final: str
    staged: str | None = None  # rename/copy strategy
    upload_id: str | None = None  # multipart strategy
    parts: list[tuple[int, str]] = []


class Receipt(BaseModel):
    """What one writer call staged: its files and the manifest rows they hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    files: list[StagedFile]
    ranges: list[Range]
    embedded: int
    errored: int
    model: str | None


class Publisher(Protocol):
    """How staged files are written and made visible on one kind of storage; chosen once per output."""

    def stage(self, kind: str, run_id: str, data: bytes) -> StagedFile: ...

    def publish(self, staged: StagedFile) -> bool:
        """Make the file visible; idempotent. False when its staged data is gone and it is not visible."""

    def abort(self, staged: StagedFile) -> None: ...

    def cleanup(self, run_id: str) -> None:
        """Remove what staged files of ``run_id`` are left (call when every entry is published)."""


class RenamePublisher:
    """Local files (an atomic rename) and GCS (server-side copy + delete); staged under ``_bitray``."""

    def __init__(self, layout: OutputLayout) -> None:
        self.layout = layout

    def stage(self, kind: str, run_id: str, data: bytes) -> StagedFile:
        name = part_name(run_id, uuid.uuid4().hex[:16])
        staged = storage.join(self.layout.staging_dir(run_id), f"{kind}-{name}")
        storage.write_bytes(staged, data, self.layout.storage)
        return StagedFile(kind=kind, final=storage.join(self.layout.data_dir(kind), name), staged=staged)

    def publish(self, staged: StagedFile) -> bool:
        assert staged.staged is not None
        return storage.move_file(staged.staged, staged.final, self.layout.storage)

    def abort(self, staged: StagedFile) -> None:
        if staged.staged:
            storage.delete(staged.staged, self.layout.storage)

    def cleanup(self, run_id: str) -> None:
        storage.delete_tree(self.layout.staging_dir(run_id), self.layout.storage)


class MultipartPublisher:
    """S3: parts uploaded to the final key by the writer, the upload completed by the driver."""

    def __init__(self, layout: OutputLayout) -> None:
        self.layout = layout

    def stage(self, kind: str, run_id: str, data: bytes) -> StagedFile:
        final = self.layout.data_file(kind, run_id, uuid.uuid4().hex[:16])
        upload = storage.upload_parts(final, data, self.layout.storage)
        return StagedFile(kind=kind, final=final, upload_id=upload.upload_id, parts=list(upload.parts))

    def publish(self, staged: StagedFile) -> bool:
        assert staged.upload_id is not None
        upload = storage.PendingUpload(staged.final, staged.upload_id, tuple(map(tuple, staged.parts)))
        return storage.complete_upload(upload, self.layout.storage)

    def abort(self, staged: StagedFile) -> None:
        if staged.upload_id:
            storage.abort_upload(staged.final, staged.upload_id, self.layout.storage)

    def cleanup(self, run_id: str) -> None:
        data_dirs = tuple(self.layout.data_dir(kind) + "/" for kind in DATA_KINDS)
        ours = f"/part-{run_id}-"
        for uri, upload_id in storage.pending_uploads(self.layout.output + "/", self.layout.storage):
            if uri.startswith(data_dirs) and ours in uri:  # one LIST for both directories
                storage.abort_upload(uri, upload_id, self.layout.storage)


def publisher_for(layout: OutputLayout) -> Publisher:
    if storage.scheme_of(layout.output) == "s3":
        return MultipartPublisher(layout)
    return RenamePublisher(layout)


class Checkpoint(BaseModel):
    """The folded log: what is committed, in a few ranges, and the counts."""

    model_config = ConfigDict(extra="forbid")

    ranges: list[Range] = []
    embedded: int = 0
    errored: int = 0
    files: int = 0
    models: list[str] = []


class CommitLog:
    """The run's write-ahead log of receipts; see the module docstring."""

    def __init__(self, layout: OutputLayout, run_id: str) -> None:
        self.layout = layout
        self.directory = layout.log_dir(run_id)
        self.seq = 0
        self.since_checkpoint = 0
        self.names: list[str] = []
        """The log's objects: what the next checkpoint replaces."""

    def read(self) -> tuple[Checkpoint, list[Receipt]]:
        """The newest checkpoint and the receipts logged after it (one LIST, a GET per object read)."""
        names = [n for n in storage.list_names(self.directory, self.layout.storage) if n.endswith(".json")]
        full = [n for n in names if n.endswith("-full.json")]
        last_full = max((int(n.split("-")[0]) for n in full), default=0)
        checkpoint = Checkpoint()
        if last_full:
            uri = storage.join(self.directory, f"{last_full:08d}-full.json")
            checkpoint = Checkpoint.model_validate(read_json(uri, self.layout.storage))
        tail = sorted(int(n[:-5]) for n in names if not n.endswith("-full.json") and int(n[:-5]) > last_full)
        with ThreadPoolExecutor(8) as pool:
            segments = list(pool.map(self._read_segment, tail))
        self.seq = max([last_full, *tail])
        self.since_checkpoint = len(tail)
        self.names = names
        return checkpoint, [receipt for segment in segments for receipt in segment]

    def _read_segment(self, seq: int) -> list[Receipt]:
        data = read_json(storage.join(self.directory, f"{seq:08d}.json"), self.layout.storage)
        return [Receipt.model_validate(entry) for entry in data["receipts"]]

    def append(self, receipts: list[Receipt]) -> None:
        self.seq += 1
        body = {"receipts": [json.loads(r.model_dump_json()) for r in receipts]}
        write_json(storage.join(self.directory, f"{self.seq:08d}.json"), body, self.layout.storage)
        self.names.append(f"{self.seq:08d}.json")
        self.since_checkpoint += 1

    def checkpoint(self, checkpoint: Checkpoint) -> None:
        """Fold everything logged so far into one object, then delete what it replaces."""
        self.seq += 1
        write_json(
            storage.join(self.directory, f"{self.seq:08d}-full.json"),
            checkpoint.model_dump(),
            self.layout.storage,
        )
        self.since_checkpoint = 0
        older, self.names = self.names, [f"{self.seq:08d}-full.json"]
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda n: storage.delete(storage.join(self.directory, n), self.layout.storage), older
                )
            )


class Lock(Protocol):
    def check(self) -> None: ...


class RunCommitter:
    """The driver's side of the protocol for one run: decides, logs, publishes; holds only ranges."""

    def __init__(self, layout: OutputLayout, run_id: str, lock: Lock, *, fresh: bool = False) -> None:
        """``fresh``: the run was just planned, so there is no log to read."""
        self.layout = layout
        self.run_id = run_id
        self.lock = lock
        self.publisher = publisher_for(layout)
        self.log = CommitLog(layout, run_id)
        checkpoint, tail = (Checkpoint(), []) if fresh else self.log.read()
        self.committed = RowRanges(checkpoint.ranges)
        self.embedded, self.errored, self.files = checkpoint.embedded, checkpoint.errored, checkpoint.files
        self.models = set(checkpoint.models)
        self.discarded = 0
        rolled = [receipt for receipt in tail if self._roll_forward(receipt)]
        for receipt in rolled:
            self._count(receipt)
        if tail:
            self.lock.check()
            self.log.checkpoint(self.checkpoint())

    def offer(self, receipt: Receipt) -> bool:
        """Commit ``receipt`` unless it overlaps what is committed (then abort it); True when committed."""
        if any(self.committed.overlaps(start, end) for start, end in receipt.ranges):
            self.discarded += 1
            log.warning("discarding a duplicate output file of run %s (Ray re-ran a task)", self.run_id)
            self._each(self.publisher.abort, receipt.files)
            return False
        self.lock.check()
        self.log.append([receipt])
        if not all(self._each(self.publisher.publish, receipt.files)):
            raise BitrayError(f"a staged output file of run {self.run_id} vanished before it was published")
        self._count(receipt)
        if self.log.since_checkpoint >= CHECKPOINT_EVERY:
            self.lock.check()
            self.log.checkpoint(self.checkpoint())
        return True

    def finish(self) -> None:
        """Remove staged leftovers (aborted or crashed attempts). Once the run's summary is written, its log
        is no longer read: ``forget`` deletes it."""
        self.lock.check()
        self.publisher.cleanup(self.run_id)

    def forget(self) -> None:
        storage.delete_tree(self.log.directory, self.layout.storage)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            ranges=list(self.committed),
            embedded=self.embedded,
            errored=self.errored,
            files=self.files,
            models=sorted(self.models),
        )

    def _count(self, receipt: Receipt) -> None:
        for start, end in receipt.ranges:
            self.committed.add(start, end)
        self.embedded += receipt.embedded
        self.errored += receipt.errored
        self.files += len(receipt.files)
        if receipt.model:
            self.models.add(receipt.model)

    def _roll_forward(self, receipt: Receipt) -> bool:
        published = self._each(self.publisher.publish, receipt.files)
        if all(published):
            return True
        if any(published):
            log.error("run %s: part of a logged output file set is lost: %s", self.run_id, receipt.files)
            return True  # visible rows must stay committed, or they would be written twice
        log.warning("run %s: a logged file was never published and its staged data is gone; redoing its rows",
                    self.run_id)  # fmt: skip
        return False

    @staticmethod
    def _each(action, files: Iterable[StagedFile]) -> list:  # noqa: ANN001
        files = list(files)
        if len(files) <= 1:
            return [action(f) for f in files]
        with ThreadPoolExecutor(len(files)) as pool:
            return list(pool.map(action, files))
