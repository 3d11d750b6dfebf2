"""Incremental state: which runs finished under an output and which object versions they recorded.

``_bitray/state/current.json`` is the one object an incremental run reads to know its past: the finished
runs (oldest first), a compacted *base* of recorded ``(path, version)`` pairs (Parquet parts sorted by
path), and the *deltas*: finished runs whose manifests (sorted by path too) are not in the base yet. What is
new is found by one streaming merge of the sorted listing against base + deltas, so neither side is ever
held in memory. After ``MAX_DELTAS`` runs the deltas are merged into a new base (one streaming pass), so an
incremental run reads the base and at most ``MAX_DELTAS`` manifests, however many runs came before.

**Deletions.** The same merge finds the recorded paths an incremental run's listing no longer has
(``deleted``), but only within that run's inputs (under one of its prefixes or manifest lines, and of its
extensions): a run over another prefix deletes nothing. The run writes them, sorted, as Parquet parts of
``runs/<run>/deleted/`` (``RunParams.deleted``), streamed like the manifest. They are tombstones in the
recorded versions: a deleted path's earlier versions are dropped (from the next base too), so an object
restored later is ``new`` again; readers get them through ``bitray.outputs.deleted_paths``.

Every update is one atomic PUT of ``current.json`` made while holding the output's lock; a new base is
written before the pointer moves to it and the old one is deleted after, so a crash leaves at worst
unreferenced files, which the next compaction removes.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from itertools import groupby
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from bitray import storage
from bitray.embed.fence import Fence
from bitray.embed.layout import OutputLayout
from bitray.embed.manifest import CHUNK_ROWS, read_parts, version_of
from bitray.embed.params import RunParams
from bitray.embed.settings import OutputSettings, common_settings, run_settings
from bitray.errors import BitrayError
from bitray.storage import ObjectInfo

MAX_DELTAS = 8
BASE_PART_ROWS = 131_072
"""Rows per part of the compacted base (about 13 MB), read whole and one at a time."""
VERSIONS_SCHEMA = pa.schema([("path", pa.string()), ("version", pa.string())])
Status = Literal["new", "changed", "unchanged", "retried", "deleted"]
"""``retried``: a recorded error taken again (``bitray.embed.retry``); ``deleted``: recorded, in the run's
inputs, and no longer listed (its ``ObjectInfo`` has the path only)."""


class IncrementalState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    finished: list[str] = []
    """Finished runs, oldest first."""
    generation: int = 0
    """Number of the base directory ``state/base-<generation>/``; 0: no base yet."""
    base: list[str] = []
    """Names of the base's parts, in path order."""
    deltas: list[str] = []
    """Finished runs (with inputs or deletions) whose manifests are not merged into the base yet."""
    retry_runs: list[str] = []
    """Finished runs that retried recorded errors (``bitray.embed.retry``), oldest first."""
    settings: OutputSettings | None = None
    """What every finished run's rows were made with (``bitray.embed.settings``); None while no run had
    anything to do, and in states written before bitray recorded it (``recorded_settings`` reads the runs)."""

    @classmethod
    def load(cls, layout: OutputLayout) -> IncrementalState:
        uri = current_uri(layout)
        data = storage.read_if_exists(uri, layout.storage)
        if data is None:
            return cls()
        try:
            return cls.model_validate_json(data)
        except ValidationError:
            raise BitrayError(
                f"{uri} is unreadable; it was edited by hand or written by another bitray version. "
                "Restore it, or start a new --output"
            ) from None

    def save(self, layout: OutputLayout, fence: Fence | None = None) -> None:
        """One PUT of ``current.json``; inside the lock's ``fence`` when given."""
        data = self.model_dump_json(indent=1).encode()
        _fenced(
            fence,
            lambda deadline: storage.write_bytes(
                current_uri(layout), data, layout.storage, deadline=deadline
            ),
        )


def _fenced(fence: Fence | None, request: Callable[[float | None], None]) -> None:
    if fence is None:
        request(None)
    else:
        fence.call(request)


def recorded_settings(layout: OutputLayout, state: IncrementalState) -> OutputSettings | None:
    """The one settings of the output's finished runs; ``BitrayError`` when their rows were made
    differently (by a bitray that did not refuse it). One request per run for a state written before the
    settings were recorded in it, none otherwise."""
    if state.settings is not None:
        return state.settings
    return common_settings(layout.output, ((run, run_settings(layout, run)) for run in state.finished))


def current_uri(layout: OutputLayout) -> str:
    return storage.join(layout.incremental_dir, "current.json")


def base_dir(layout: OutputLayout, generation: int) -> str:
    return storage.join(layout.incremental_dir, f"base-{generation:06d}")


def recorded_versions(layout: OutputLayout, state: IncrementalState) -> Iterator[tuple[str, str]]:
    """Every recorded ``(path, version)``, sorted, streamed from the base and the deltas' manifests; a
    delta's deletions drop the versions recorded before it (memory: the entries of one path)."""
    streams = [((path, 0, version) for path, version in _base_versions(layout, state))]
    for order, run_id in enumerate(state.deltas, 1):
        streams.append(_delta_entries(layout, run_id, order))
    for path, entries in groupby(heapq.merge(*streams, key=lambda e: (e[0], e[1])), key=lambda e: e[0]):
        versions: set[str] = set()
        for _, _, version in entries:
            if version is None:
                versions.clear()
            else:
                versions.add(version)
        for version in sorted(versions):
            yield path, version


def _delta_entries(layout: OutputLayout, run_id: str, order: int) -> Iterator[tuple[str, int, str | None]]:
    """``(path, order, version)`` of a run's manifest and ``(path, order, None)`` of its deletions, sorted."""
    params = RunParams.load(layout, run_id)
    recorded = ((path, order, version) for path, version in _manifest_versions(layout, params))
    deleted = ((path, order, None) for path in deleted_paths(layout, params))
    return heapq.merge(recorded, deleted, key=lambda e: e[0])


def deleted_paths(layout: OutputLayout, params: RunParams) -> Iterator[str]:
    """The paths the run found deleted, sorted (``runs/<run>/deleted/``)."""
    uris = [storage.join(layout.deleted_dir(params.run_id), part.name) for part in params.deleted]
    for table in read_parts(uris, layout.storage, columns=["path"]):
        yield from table.column("path").to_pylist()


def _base_versions(layout: OutputLayout, state: IncrementalState) -> Iterator[tuple[str, str]]:
    uris = [storage.join(base_dir(layout, state.generation), name) for name in state.base]
    for table in read_parts(uris, layout.storage):
        yield from zip(table.column("path").to_pylist(), table.column("version").to_pylist(), strict=True)


def _manifest_versions(layout: OutputLayout, params: RunParams) -> Iterator[tuple[str, str]]:
    uris = [storage.join(layout.manifest_dir(params.run_id), part.name) for part in params.manifest]
    names = ["path", "etag", "size", "mtime_ns"]
    for table in read_parts(uris, layout.storage, columns=names):
        columns = [table.column(name).to_pylist() for name in names]
        for path, etag, size, mtime_ns in zip(*columns, strict=True):
            yield path, version_of(etag, size, mtime_ns)


def diff(
    listed: Iterable[ObjectInfo],
    recorded: Iterable[tuple[str, str]],
    in_scope: Callable[[str], bool] | None = None,
) -> Iterator[tuple[ObjectInfo, Status]]:
    """Each listed object with its status against the recorded versions; both inputs sorted by path.

    With ``in_scope``, also each recorded path that is not listed and for which ``in_scope`` holds (the
    run's inputs cover it), as ``deleted``, in path order with the rest."""
    versions = iter(recorded)
    current = next(versions, None)
    for obj in listed:
        while current is not None and current[0] < obj.uri:
            path = current[0]
            while current is not None and current[0] == path:
                current = next(versions, None)
            if in_scope is not None and in_scope(path):
                yield ObjectInfo(path, 0), "deleted"
        seen: set[str] = set()
        while current is not None and current[0] == obj.uri:
            seen.add(current[1])
            current = next(versions, None)
        if obj.version in seen or _recorded_before_generations(obj) in seen:
            yield obj, "unchanged"
        else:
            yield obj, "changed" if seen else "new"
        # the next listed path is larger: versions of this path are consumed, none is skipped
    while current is not None:
        path = current[0]
        while current is not None and current[0] == path:
            current = next(versions, None)
        if in_scope is not None and in_scope(path):
            yield ObjectInfo(path, 0), "deleted"


def _recorded_before_generations(obj: ObjectInfo) -> str | None:
    """The version a ``gs://`` object had when bitray recorded GCS objects by size and mtime (before it
    recorded their generation): the same object then, so upgrading does not re-embed a bucket."""
    if not obj.uri.startswith("gs://"):
        return None
    return ObjectInfo(obj.uri, obj.size, obj.mtime_ns).version


def record_run(
    layout: OutputLayout, state: IncrementalState, params: RunParams, fence: Fence | None = None
) -> IncrementalState:
    """Add a finished run to the state (idempotent), compacting the deltas into a new base when due; each
    write inside the lock's ``fence`` when given."""
    if params.run_id in state.finished:
        return state
    state = state.model_copy(deep=True)
    try:
        earlier = recorded_settings(layout, state)
        summary = layout.read_summary(params.run_id) or {}
        mine = OutputSettings.of_run(params, summary.get("model_id")) if params.rows else None
        state.settings = common_settings(layout.output, [("earlier runs", earlier), (params.run_id, mine)])
    except BitrayError:  # mixed by an older bitray: readers find it out from the runs themselves
        state.settings = None
    state.finished.append(params.run_id)
    if params.rows or params.deleted:
        state.deltas.append(params.run_id)
    if params.retried:
        state.retry_runs.append(params.run_id)
    if len(state.deltas) > MAX_DELTAS:
        state = _compact(layout, state, fence)
    state.save(layout, fence)
    return state


def _compact(layout: OutputLayout, state: IncrementalState, fence: Fence | None) -> IncrementalState:
    """Merge the base and the deltas into base ``generation + 1`` (streaming) and point the state at it."""
    old = state.generation
    generation = old + 1
    directory = base_dir(layout, generation)
    # left by a compaction that crashed before its pointer
    _fenced(fence, lambda deadline: storage.delete_tree(directory, layout.storage, deadline=deadline))
    names: list[str] = []
    rows: list[tuple[str, str]] = []
    previous = None
    for pair in recorded_versions(layout, state):
        if pair == previous:
            continue
        previous = pair
        rows.append(pair)
        if len(rows) == BASE_PART_ROWS:
            names.append(_write_versions(directory, len(names), rows, layout, fence))
            rows = []
    if rows or not names:
        names.append(_write_versions(directory, len(names), rows, layout, fence))
    compacted = state.model_copy(update={"generation": generation, "base": names, "deltas": []})
    compacted.save(layout, fence)
    if old:
        old_dir = base_dir(layout, old)
        _fenced(fence, lambda deadline: storage.delete_tree(old_dir, layout.storage, deadline=deadline))
    return compacted


def _write_versions(
    directory: str, index: int, rows: list[tuple[str, str]], layout: OutputLayout, fence: Fence | None
) -> str:
    table = pa.table({"path": [r[0] for r in rows], "version": [r[1] for r in rows]}, schema=VERSIONS_SCHEMA)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, row_group_size=CHUNK_ROWS)
    name = f"part-{index:05d}.parquet"
    uri, data = storage.join(directory, name), buffer.getvalue().to_pybytes()
    _fenced(fence, lambda deadline: storage.write_bytes(uri, data, layout.storage, deadline=deadline))
    return name
