"""A run's manifest: every input listed once, sorted by URI, numbered, streamed to Parquet parts.

The driver never holds a listing: objects stream from the listers (S3 pages of 1,000 keys, local walks)
through a merge of the inputs into ``PART_ROWS``-row Parquet parts, each buffered once and written whole.
Sorted order is what lets an incremental run compare a listing with what earlier runs recorded in one
streaming pass (``bitray.embed.state``). Row numbers (``row``) name an input everywhere downstream: decode
tasks, actors, output files and the commit log speak of row ranges, never of paths.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from bitray import storage
from bitray.config import EmbedConfig, StorageConfig
from bitray.embed.fence import Fence
from bitray.embed.params import ManifestPart
from bitray.errors import BitrayError
from bitray.prefetch import prefetched
from bitray.storage import ObjectInfo

MANIFEST_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("path", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
    ]
)
PART_ROWS = 8_192
"""Rows per manifest part (about 1 MB): a decode task reads the part it works on with one GET, and the
driver buffers one part while writing. 100M images make about 12,200 parts."""
CHUNK_ROWS = 8_192
"""Rows per Arrow record batch and Parquet row group while streaming."""


def listed_inputs(config: EmbedConfig, storage_config: StorageConfig) -> Iterator[ObjectInfo]:
    """Every input object once, in URI order: the sorted listings of all inputs merged, duplicates dropped.

    A ``manifest`` file of URIs is read whole and sorted (it is a list the user wrote); prefixes stream.
    """
    uris = list(config.inputs)
    if config.manifest:
        text = storage.read_bytes(config.manifest, storage_config).decode("utf-8")
        uris += sorted(
            {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
        )
    if not uris:
        raise BitrayError("no input given; pass --input URI (or inputs/manifest in the config file)")
    streams = [
        _checked_order(uri, storage.list_objects(uri, extensions=config.extensions, storage=storage_config))
        for uri in uris
    ]
    previous: str | None = None
    for obj in heapq.merge(*streams, key=lambda o: o.uri):
        if obj.uri != previous:
            yield obj
        previous = obj.uri


def _checked_order(uri: str, objects: Iterable[ObjectInfo]) -> Iterator[ObjectInfo]:
    """Pass a listing through, failing loudly if it is not in URI order (a merge would silently mix it)."""
    previous = ""
    for obj in objects:
        if obj.uri < previous:
            raise BitrayError(f"the listing of {uri!r} is not in key order ({obj.uri!r} after {previous!r})")
        previous = obj.uri
        yield obj


def manifest_table(objects: Sequence[ObjectInfo], first_row: int = 0) -> pa.Table:
    """Objects as manifest rows, numbered from ``first_row``: what decode tasks work on."""
    columns = {
        "row": range(first_row, first_row + len(objects)),
        "path": [o.uri for o in objects],
        "etag": [o.etag for o in objects],
        "size": [o.size for o in objects],
        "mtime_ns": [o.mtime_ns for o in objects],
    }
    return pa.table(columns, schema=MANIFEST_SCHEMA)


class ManifestWriter:
    """Number objects and write them as sorted Parquet parts under ``directory``; memory: one part.

    ``fence``: each part is written inside the output lock's fence (``bitray.embed.fence``)."""

    def __init__(self, directory: str, storage_config: StorageConfig, fence: Fence | None = None) -> None:
        self.directory = directory
        self.storage = storage_config
        self.fence = fence
        self.parts: list[ManifestPart] = []
        self.rows = 0
        self._batches: list[pa.RecordBatch] = []
        self._objects: list[ObjectInfo] = []

    def add(self, obj: ObjectInfo) -> None:
        self._objects.append(obj)
        self.rows += 1
        if len(self._objects) == CHUNK_ROWS:
            self._seal_batch()
        if self.rows % PART_ROWS == 0:
            self._write_part()

    def close(self) -> list[ManifestPart]:
        self._seal_batch()
        self._write_part()
        return self.parts

    def _seal_batch(self) -> None:
        if self._objects:
            self._batches += manifest_table(self._objects, self.rows - len(self._objects)).to_batches()
            self._objects = []

    def _write_part(self) -> None:
        if not self._batches:
            return
        table = pa.Table.from_batches(self._batches, schema=MANIFEST_SCHEMA)
        self._batches = []
        name = f"part-{len(self.parts):05d}.parquet"
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, row_group_size=CHUNK_ROWS)
        uri, data = storage.join(self.directory, name), buffer.getvalue().to_pybytes()
        if self.fence is None:
            storage.write_bytes(uri, data, self.storage)
        else:
            self.fence.call(lambda deadline: storage.write_bytes(uri, data, self.storage, deadline=deadline))
        self.parts.append(ManifestPart(name=name, first_row=self.rows - table.num_rows, rows=table.num_rows))


def read_part(uri: str, storage_config: StorageConfig, columns: list[str] | None = None) -> pa.Table:
    """One Parquet part of bitray's state, read whole with one GET."""
    data = storage.read_if_exists(uri, storage_config)
    if data is None:
        raise BitrayError(f"{uri!r} is missing; the output's bitray state was changed by hand")
    return pq.read_table(pa.BufferReader(data), columns=columns)


def read_parts(
    uris: list[str], storage_config: StorageConfig, columns: list[str] | None = None, ahead: int = 8
) -> Iterator[pa.Table]:
    """The parts in order, up to ``ahead`` fetched concurrently (memory: ``ahead`` parts)."""
    return prefetched(lambda uri: read_part(uri, storage_config, columns), uris, ahead)


def version_of(etag: str | None, size: int, mtime_ns: int | None) -> str:
    """The same version string as ``ObjectInfo.version``."""
    return ObjectInfo("", size, mtime_ns, etag).version
