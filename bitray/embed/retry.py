"""Which recorded errors of an output are still open, for ``bitray embed --retry-errors``.

An error row stays retryable on purpose: access that was refused may be granted, a decoder may improve.
A retry run takes as its inputs every object version whose latest result under the output is an error row
(``retry_errors``; with ``incremental`` too, only those still listed at the same version, beside what is
new), and commits like any run: what embeds now goes to ``embeddings/``, what fails again gets a new error
row. Error rows are never rewritten; a later run that processed the same object version supersedes them.
Only retry runs process a version a second time (incremental runs skip recorded versions, and plain runs
refuse an output that holds runs), and each keeps the versions it retried beside its manifest
(``runs/<run>/retried/``), so the open errors are found from the error files and those lists alone: reads
that grow with the output's errors, never with its images.

Errors that say the listed version is gone (changed or deleted after it was listed) are not open: that
version cannot be read again, and an ``--incremental`` run embeds its successor. For the same reason only a
path's newest recorded version can be open, so a retry run takes each path once.

Memory: the output's error rows (paths and versions), small next to its images.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from bitray import storage
from bitray.embed.layout import OutputLayout
from bitray.embed.manifest import read_parts
from bitray.embed.params import RunParams
from bitray.embed.state import IncrementalState
from bitray.errors import BitrayError
from bitray.storage import ObjectInfo

GONE = tuple(f"{cls.__name__}:" for cls in (storage.ObjectChanged, storage.ObjectMissing))
"""Error messages (``Type: message``) that mean the listed version no longer exists."""


@dataclass(frozen=True)
class OpenError:
    """A recorded error that is still the latest result for its object version."""

    object: ObjectInfo
    stage: str
    error: str
    run_id: str


def open_errors(layout: OutputLayout, state: IncrementalState) -> list[OpenError]:
    """Object versions whose latest result under the output is an error row of a finished run, by path.

    At most one version per path: the newest (latest ``mtime``, then the latest run that saw it) of the
    versions the error files and retry lists know. An older version was replaced, so it cannot be read
    again; a retry holding both would write its path twice in one run."""
    if not state.finished:
        raise BitrayError(
            f"{layout.output} holds no finished embedding run, so no recorded errors; check the output path"
        )
    order = {run: i for i, run in enumerate(state.finished)}
    # (path, version) -> (rank of its latest result, the error if that result is a retryable error row);
    # rank = (run order, 1 for an error row, 0 for having been retried): a run's own error row comes last
    latest: dict[tuple[str, str], tuple[tuple[int, int], OpenError | None]] = {}
    newest: dict[str, tuple[tuple[int, int], str]] = {}  # path -> ((mtime_ns, run order), version)

    def offer(obj: ObjectInfo, rank: tuple[int, int], still_open: OpenError | None) -> None:
        key = (obj.uri, obj.version)
        if key not in latest or latest[key][0] < rank:
            latest[key] = (rank, still_open)
        age = (obj.mtime_ns if obj.mtime_ns is not None else -1, rank[0])
        if obj.uri not in newest or newest[obj.uri][0] < age:
            newest[obj.uri] = (age, obj.version)

    for run in state.retry_runs:
        for obj in _retried(layout, run):
            offer(obj, (order[run], 0), None)
    for row in _error_rows(layout, set(order)):
        offer(row.object, (order[row.run_id], 1), None if row.error.startswith(GONE) else row)
    found = (
        row for (uri, version), (_, row) in latest.items() if row is not None and newest[uri][1] == version
    )
    return sorted(found, key=lambda row: (row.object.uri, row.object.version))


def _retried(layout: OutputLayout, run_id: str) -> Iterator[ObjectInfo]:
    params = RunParams.load(layout, run_id)
    uris = [storage.join(layout.retried_dir(run_id), part.name) for part in params.retried]
    names = ["path", "etag", "size", "mtime_ns"]
    for table in read_parts(uris, layout.storage, columns=names):
        for path, etag, size, mtime_ns in zip(*(table.column(n).to_pylist() for n in names), strict=True):
            yield ObjectInfo(path, size, mtime_ns, etag)


def _error_rows(layout: OutputLayout, runs: set[str]) -> Iterator[OpenError]:
    """Every row in the committed error files of ``runs``."""
    names = ["path", "etag", "size", "stage", "error", "run_id"]
    for table in read_parts(layout.data_files("errors", runs), layout.storage, columns=[*names, "mtime"]):
        mtimes = table.column("mtime").cast(pa.int64()).to_pylist()
        columns = [table.column(n).to_pylist() for n in names]
        for (path, etag, size, stage, error, run), mtime_ns in zip(
            zip(*columns, strict=True), mtimes, strict=True
        ):
            yield OpenError(ObjectInfo(path, size, mtime_ns, etag), stage or "", error or "", run)
