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
version cannot be read again, and an ``--incremental`` run embeds its successor.

Memory: the output's error rows (paths and versions), small next to its images.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from bitray import storage
from bitray.embed.layout import OutputLayout
from bitray.embed.manifest import read_parts
from bitray.embed.params import RunParams
from bitray.embed.state import IncrementalState
from bitray.storage import ObjectInfo

GONE = tuple(f"{cls.__name__}:" for cls in (storage.ObjectChanged, storage.ObjectMissing))
"""Error messages (``Type: message``) that mean the listed version no longer exists."""


def open_errors(layout: OutputLayout, state: IncrementalState) -> list[ObjectInfo]:
    """Object versions whose latest result under the output is an error row of a finished run, by path."""
    order = {run: i for i, run in enumerate(state.finished)}
    # (path, version) -> (rank of its latest result, the version if that result is a retryable error);
    # rank = (run order, 1 for an error row, 0 for having been retried): a run's own error row comes last
    latest: dict[tuple[str, str], tuple[tuple[int, int], ObjectInfo | None]] = {}

    def offer(obj: ObjectInfo, rank: tuple[int, int], still_open: bool) -> None:
        key = (obj.uri, obj.version)
        if key not in latest or latest[key][0] < rank:
            latest[key] = (rank, obj if still_open else None)

    for run in state.retry_runs:
        for obj in _retried(layout, run):
            offer(obj, (order[run], 0), still_open=False)
    for obj, run, error in _error_rows(layout, set(order)):
        offer(obj, (order[run], 1), still_open=not (error or "").startswith(GONE))
    return sorted((obj for _, obj in latest.values() if obj is not None), key=lambda o: (o.uri, o.version))


def _retried(layout: OutputLayout, run_id: str) -> Iterator[ObjectInfo]:
    params = RunParams.load(layout, run_id)
    uris = [storage.join(layout.retried_dir(run_id), part.name) for part in params.retried]
    names = ["path", "etag", "size", "mtime_ns"]
    for table in read_parts(uris, layout.storage, columns=names):
        for path, etag, size, mtime_ns in zip(*(table.column(n).to_pylist() for n in names), strict=True):
            yield ObjectInfo(path, size, mtime_ns, etag)


def _error_rows(layout: OutputLayout, runs: set[str]) -> Iterator[tuple[ObjectInfo, str, str | None]]:
    """``(version, run, error)`` of every row in the committed error files of ``runs``."""
    names = ["path", "etag", "size", "run_id", "error"]
    for table in read_parts(layout.data_files("errors", runs), layout.storage, columns=[*names, "mtime"]):
        mtimes = table.column("mtime").cast(pa.int64()).to_pylist()
        columns = [table.column(n).to_pylist() for n in names]
        for (path, etag, size, run, error), mtime_ns in zip(zip(*columns, strict=True), mtimes, strict=True):
            yield ObjectInfo(path, size, mtime_ns, etag), run, error
