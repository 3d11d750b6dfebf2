"""Exactly-once output: staged files, one committer (the driver), a write-ahead commit log.

The protocol, as Hadoop's S3A committers do it:

1. **Stage** (writer tasks): a file of ``rows_per_file`` rows is written where no reader looks. On S3 it
   is a multipart upload to its final key that is *not completed* (invisible to LIST and GET); locally and
   on GCS it is a file under ``_bitray/runs/<run>/staging/``. The writer returns a *receipt*: the staged
   files and the manifest row ranges they hold. Final names carry a fresh uid per attempt, so two attempts
   never write the same name.
2. **Decide** (driver, single-threaded): a receipt whose ranges overlap anything committed (Ray re-ran a
   task whose output it had lost) is aborted whole; its other rows stay pending for the next pass.
3. **Log** (the commit point): the driver appends the receipt to the run's log by *creating*
   ``log/<seq>.json``, the next sequence number, only if nothing has that name (S3 ``If-None-Match: *``,
   GCS ``if_generation_match=0``, locally a hard link of a whole file: ``storage.create_bytes``).
4. **Publish**: the driver completes the upload (S3) or moves the staged file to its final name (a link
   locally, a server-side copy then delete on GCS). Each makes a whole file appear at once.

Every request of (3) and (4), of ``cleanup`` and of the run's end goes through the output lock's fence
(``bitray.embed.fence``): it must end by the lock's ``deadline()``, and the fence is checked again after
it, so a driver whose lease lapsed stops (``LockLost``) before its next request and never acts on what it
learns from a request that outlived the fence.

Every ``CHECKPOINT_EVERY`` segments, the log is folded into a checkpoint, the next ``log/<seq>.json``
(created the same way) holding the committed row ranges as a few intervals plus counts. Reading the log
costs one LIST per 1,000 objects and GETs from the newest object down to the newest checkpoint, a few
at a time: at most ``CHECKPOINT_EVERY + READ_AHEAD``, whatever the size of the run. Nothing in the log
is deleted before the run is finished (``forget``): about one small object per ``rows_per_file`` rows.
(Logs written before checkpoints shared the segments' names hold ``<seq>-full.json`` checkpoints; they
are read too.)

Why the log is one history whoever writes it: each sequence number is created once, and a writer creates
``seq`` only after it read or wrote ``seq - 1``, so it knew everything logged before: its receipt was
decided against all of it and never overlaps an earlier entry. So **every logged receipt is valid and is
rolled forward, never discarded**. A writer that finds its next number taken (another driver wrote it)
reads the log again, rolls the newcomers forward and decides its receipt anew. No number is deleted while
the run is unfinished, so none is ever created twice.

Why every failure point is safe:
- Killed before (3): nothing is logged; staged files are invisible and the rows pending. The rerun stages
  new files under new names; stale staged files are removed when the run finishes (``cleanup``, which
  matches the run id exactly: run ``nightly`` never touches run ``nightly-2``'s uploads).
- Killed between (3) and (4), or (3) failed after its request may have landed: the rerun reads the entry
  and publishes it (*roll forward*): completing or moving again is idempotent, and the rows are committed,
  never redone. A run that may have logged anything is never discarded.
- Killed during (4) of an entry with an embeddings and an errors file: the rerun publishes the other.
- Killed while checkpointing: a checkpoint is one create; until it exists the segments before it are
  read, and after it exists they are not.
- Two drivers: only the holder of the lock commits, inside its fence. A driver whose lease lapsed stops
  with "lost the lock" at its next request and touches nothing more (it does not discard its run: the
  run it would delete may be the taker's now). A request of its that reached the store after all (sent
  inside the fence, delayed past it) is at worst: its log create, which the exclusive names make part of
  the one history (the taker meets it at its next append, rolls it forward and redecides); an idempotent
  publish of a logged entry; or the abort of a staged upload, whose entry then cannot publish and whose
  rows are redone on roll forward (see below). Nothing visible is ever written twice or deleted.
- A staged file gone before it was published (an S3 lifecycle rule aborted the upload of a run resumed
  days later): the entry is dropped on roll forward and its rows are redone; nothing became visible.
Readers list ``embeddings/`` and ``errors/`` and see only published files, each written whole.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from bitray import storage
from bitray.embed.fence import Fence, Lock
from bitray.embed.layout import DATA_KINDS, OutputLayout, part_name, read_json, run_of_part
from bitray.embed.ranges import Range, RowRanges
from bitray.errors import BitrayError

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 64
READ_AHEAD = 8
"""Log objects a reader GETs at once."""


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
    """How staged files are written and made visible on one kind of storage; chosen once per output.

    ``deadline``: a ``time.monotonic()`` instant by which the requests must end (``bitray.embed.fence``).
    """

    def stage(self, kind: str, run_id: str, data: bytes) -> StagedFile: ...

    def publish(self, staged: StagedFile, deadline: float | None = None) -> bool:
        """Make the file visible; idempotent. False when its staged data is gone and it is not visible."""

    def abort(self, staged: StagedFile, deadline: float | None = None) -> None: ...

    def cleanup(self, run_id: str, fence: Fence) -> None:
        """Remove what staged files of ``run_id`` are left (call when every entry is published)."""


class RenamePublisher:
    """Local files (an exclusive link) and GCS (server-side copy + delete); staged under ``_bitray``."""

    def __init__(self, layout: OutputLayout) -> None:
        self.layout = layout

    def stage(self, kind: str, run_id: str, data: bytes) -> StagedFile:
        name = part_name(run_id, uuid.uuid4().hex[:16])
        staged = storage.join(self.layout.staging_dir(run_id), f"{kind}-{name}")
        storage.write_bytes(staged, data, self.layout.storage)
        return StagedFile(kind=kind, final=storage.join(self.layout.data_dir(kind), name), staged=staged)

    def publish(self, staged: StagedFile, deadline: float | None = None) -> bool:
        assert staged.staged is not None
        return storage.move_file(staged.staged, staged.final, self.layout.storage)

    def abort(self, staged: StagedFile, deadline: float | None = None) -> None:
        if staged.staged:
            storage.delete(staged.staged, self.layout.storage, deadline=deadline)

    def cleanup(self, run_id: str, fence: Fence) -> None:
        directory = self.layout.staging_dir(run_id)  # the run's own directory: no other run's files
        fence.call(lambda deadline: storage.delete_tree(directory, self.layout.storage, deadline=deadline))


class MultipartPublisher:
    """S3: parts uploaded to the final key by the writer, the upload completed by the driver."""

    def __init__(self, layout: OutputLayout) -> None:
        self.layout = layout

    def stage(self, kind: str, run_id: str, data: bytes) -> StagedFile:
        final = self.layout.data_file(kind, run_id, uuid.uuid4().hex[:16])
        upload = storage.upload_parts(final, data, self.layout.storage)
        return StagedFile(kind=kind, final=final, upload_id=upload.upload_id, parts=list(upload.parts))

    def publish(self, staged: StagedFile, deadline: float | None = None) -> bool:
        assert staged.upload_id is not None
        upload = storage.PendingUpload(staged.final, staged.upload_id, tuple(map(tuple, staged.parts)))
        return storage.complete_upload(upload, self.layout.storage, deadline=deadline)

    def abort(self, staged: StagedFile, deadline: float | None = None) -> None:
        if staged.upload_id:
            storage.abort_upload(staged.final, staged.upload_id, self.layout.storage, deadline=deadline)

    def cleanup(self, run_id: str, fence: Fence) -> None:
        for uri, upload_id in fence.call(lambda deadline: self.staged_uploads(run_id, deadline)):
            fence.call(
                lambda d, uri=uri, i=upload_id: storage.abort_upload(uri, i, self.layout.storage, deadline=d)
            )

    def staged_uploads(self, run_id: str, deadline: float | None = None) -> list[tuple[str, str]]:
        """(URI, upload id) of the uploads in progress of exactly run ``run_id`` (one LIST per 1,000)."""
        data_dirs = tuple(self.layout.data_dir(kind) + "/" for kind in DATA_KINDS)
        return [
            (uri, upload_id)
            for uri, upload_id in storage.pending_uploads(
                self.layout.output + "/", self.layout.storage, deadline=deadline
            )
            if uri.startswith(data_dirs) and run_of_part(uri.rsplit("/", 1)[1]) == run_id
        ]


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


class LogConflict(BitrayError):
    """The log's next sequence number was created by another writer: read the log again."""


class CommitLog:
    """The run's write-ahead log of receipts and checkpoints; see the module docstring."""

    def __init__(self, layout: OutputLayout, run_id: str) -> None:
        self.layout = layout
        self.directory = layout.log_dir(run_id)
        self.seq = 0
        self.since_checkpoint = 0

    def read(self) -> tuple[Checkpoint, list[Receipt]]:
        """The newest checkpoint and the receipts logged after it: one LIST, then GETs from the newest
        object down to the newest checkpoint (``READ_AHEAD`` at a time)."""
        names = [n for n in storage.list_names(self.directory, self.layout.storage) if n.endswith(".json")]
        legacy = [int(n.split("-")[0]) for n in names if n.endswith("-full.json")]
        last_full = max(legacy, default=0)
        seqs = sorted(int(n[:-5]) for n in names if n[:-5].isdigit() and int(n[:-5]) > last_full)
        self.seq = max([last_full, *seqs])
        newest_first: list[dict] = []
        with ThreadPoolExecutor(READ_AHEAD) as pool:
            for top in range(len(seqs), 0, -READ_AHEAD):
                newest_first += reversed(
                    list(pool.map(self._read_object, seqs[max(0, top - READ_AHEAD) : top]))
                )
                if any("checkpoint" in body for body in newest_first):
                    break
        tail: list[dict] = []
        checkpoint = None
        for body in newest_first:
            if "checkpoint" in body:
                checkpoint = Checkpoint.model_validate(body["checkpoint"])
                break
            tail.append(body)
        if checkpoint is None and last_full:  # a log written before checkpoints shared the segments' names
            uri = storage.join(self.directory, f"{last_full:08d}-full.json")
            checkpoint = Checkpoint.model_validate(read_json(uri, self.layout.storage))
        self.since_checkpoint = len(tail)
        receipts = [Receipt.model_validate(entry) for body in reversed(tail) for entry in body["receipts"]]
        return checkpoint or Checkpoint(), receipts

    def _read_object(self, seq: int) -> dict:
        return read_json(storage.join(self.directory, f"{seq:08d}.json"), self.layout.storage)

    def append(self, receipts: list[Receipt], deadline: float | None = None) -> None:
        """Log ``receipts`` as the next segment; ``LogConflict`` when another writer took its number."""
        self._create({"receipts": [json.loads(r.model_dump_json()) for r in receipts]}, deadline)
        self.since_checkpoint += 1

    def checkpoint(self, checkpoint: Checkpoint, deadline: float | None = None) -> None:
        """Fold everything logged so far into the next object, so that a reader stops there. Nothing is
        deleted: a deleted number could be created again by a writer that never saw the checkpoint."""
        self._create({"checkpoint": checkpoint.model_dump()}, deadline)
        self.since_checkpoint = 0

    def _create(self, body: dict, deadline: float | None) -> None:
        seq = self.seq + 1
        name = f"{seq:08d}.json"
        data = json.dumps(body, indent=1, sort_keys=True).encode()
        if not storage.create_bytes(
            storage.join(self.directory, name), data, self.layout.storage, deadline=deadline
        ):
            raise LogConflict(f"{storage.join(self.directory, name)} was written by another driver")
        self.seq = seq


class RunCommitter:
    """The driver's side of the protocol for one run: decides, logs, publishes; holds only ranges.

    ``logged``: whether the run's log may hold anything (read, or a create was attempted): such a run is
    rolled forward, never discarded.
    """

    def __init__(self, layout: OutputLayout, run_id: str, lock: Lock, *, fresh: bool = False) -> None:
        """``fresh``: the run was just planned, so there is no log to read."""
        self.layout = layout
        self.run_id = run_id
        self.fence = Fence(lock)
        self.publisher = publisher_for(layout)
        self.log = CommitLog(layout, run_id)
        self.logged = False
        self.discarded = 0
        self._load(fresh=fresh)

    def _load(self, *, fresh: bool = False) -> None:
        """(Re)build the committed state from the log, rolling forward what is logged after its checkpoint."""
        checkpoint, tail = (Checkpoint(), []) if fresh else self.log.read()
        self.logged = self.logged or self.log.seq > 0
        self.committed = RowRanges(checkpoint.ranges)
        self.embedded, self.errored, self.files = checkpoint.embedded, checkpoint.errored, checkpoint.files
        self.models = set(checkpoint.models)
        rolled = [receipt for receipt in tail if self._roll_forward(receipt)]
        for receipt in rolled:
            self._count(receipt)
        if tail:
            self._checkpoint()

    def offer(self, receipt: Receipt) -> bool:
        """Commit ``receipt`` unless it overlaps what is committed (then abort it); True when committed."""
        while True:
            if any(self.committed.overlaps(start, end) for start, end in receipt.ranges):
                self.discarded += 1
                log.warning("discarding a duplicate output file of run %s (Ray re-ran a task)", self.run_id)
                self._each(self.publisher.abort, receipt.files)
                return False
            self.logged = True  # from the first try on: its request may land whatever its outcome
            try:
                self.fence.call(lambda deadline: self.log.append([receipt], deadline))
                break
            except LogConflict:
                log.warning("run %s: another driver logged a receipt; reading the log again", self.run_id)
                self._load()
        if not all(self._each(self.publisher.publish, receipt.files)):
            raise BitrayError(f"a staged output file of run {self.run_id} vanished before it was published")
        self._count(receipt)
        if self.log.since_checkpoint >= CHECKPOINT_EVERY:
            self._checkpoint()
        return True

    def finish(self) -> None:
        """Remove staged leftovers (aborted or crashed attempts). Once the run's summary is written, its log
        is no longer read: ``forget`` deletes it."""
        self.publisher.cleanup(self.run_id, self.fence)

    def forget(self) -> None:
        directory = self.log.directory
        self.fence.call(
            lambda deadline: storage.delete_tree(directory, self.layout.storage, deadline=deadline)
        )

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            ranges=list(self.committed),
            embedded=self.embedded,
            errored=self.errored,
            files=self.files,
            models=sorted(self.models),
        )

    def _checkpoint(self) -> None:
        folded = self.checkpoint()
        try:
            self.fence.call(lambda deadline: self.log.checkpoint(folded, deadline))
        except LogConflict:  # another driver logged first: its entries are rolled forward, folded later
            log.warning("run %s: another driver logged a receipt; reading the log again", self.run_id)
            self._load()

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

    def _each(self, action: Callable[[StagedFile, float | None], Any], files: Iterable[StagedFile]) -> list:
        """``action(file, deadline)`` for each file inside the fence, in parallel for several files."""
        fenced = lambda f: self.fence.call(lambda deadline: action(f, deadline))  # noqa: E731
        files = list(files)
        if len(files) <= 1:
            return [fenced(f) for f in files]
        with ThreadPoolExecutor(len(files)) as pool:
            return list(pool.map(fenced, files))
