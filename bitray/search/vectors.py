"""Embedding rows out of Parquet, a row-group batch at a time, with each object's newest version only.

Nothing here holds a whole table: files are opened one at a time through ``bitray.storage`` (local,
``s3://``, ``gs://``) and read with ``ParquetFile.iter_batches``, which decodes row group by row group.
An object embedded by several runs (it changed between them) has one row per version; the version of the
run that finished last is the live one, and ``newest_versions`` finds it from the small columns alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bitray import storage
from bitray.config import StorageConfig
from bitray.errors import BitrayError

ROW_COLUMNS = ("path", "model", "width", "height", "etag", "size", "mtime", "run_id")
"""The columns an index keeps about each vector (``model`` is checked, then dropped)."""
BATCH_ROWS = 4096


ROWS_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("path", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.timestamp("ns", tz="UTC")),
        ("run_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
"""What an index keeps of every vector beside it: its id and the object version it came from."""


def read_batches(
    files: Iterable[str],
    columns: Sequence[str],
    storage_config: StorageConfig | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """``columns`` of every file, in batches of at most ``batch_rows`` rows, one file open at a time."""
    for uri in files:
        fs, path = storage.filesystem_for(uri, storage_config)
        try:
            with fs.open_input_file(path) as handle:
                parquet = pq.ParquetFile(handle)
                missing = set(columns) - set(parquet.schema_arrow.names)
                if missing:
                    raise BitrayError(
                        f"{uri!r} lacks column(s) {sorted(missing)}: it is not an embedding file of bitray"
                    )
                yield from parquet.iter_batches(batch_size=batch_rows, columns=list(columns))
        except FileNotFoundError:
            raise BitrayError(f"{uri!r} disappeared while being read; run the command again") from None
        except OSError as exc:
            raise BitrayError(f"cannot read {uri!r}: {exc}") from None


def count_rows(files: Iterable[str], storage_config: StorageConfig | None = None) -> int:
    """Rows in the files, from their footers alone."""
    total = 0
    for uri in files:
        fs, path = storage.filesystem_for(uri, storage_config)
        with fs.open_input_file(path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def newest_versions(
    files: Sequence[str], run_order: Sequence[str], storage_config: StorageConfig | None = None
) -> dict[str, str]:
    """``path -> run id`` of each object's live row: the one of the run latest in ``run_order``."""
    rank = {run: i for i, run in enumerate(run_order)}
    newest: dict[str, str] = {}
    for batch in read_batches(files, ("path", "run_id"), storage_config):
        for path, run in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            held = newest.get(path)
            if held is None or rank[run] > rank[held]:
                newest[path] = run
    return newest


def drop_deleted(newest: dict[str, str], run_order: Sequence[str], deleted: dict[str, set[str]]) -> None:
    """Remove from ``newest`` the paths a run later than their live row's found deleted."""
    rank = {run: i for i, run in enumerate(run_order)}
    for run, paths in deleted.items():
        for path in paths:
            if path in newest and rank[run] > rank[newest[path]]:
                del newest[path]


def live_mask(batch: pa.RecordBatch, newest: dict[str, str]) -> np.ndarray:
    """Which rows of ``batch`` (with ``path`` and ``run_id``) are their object's live version."""
    paths = batch.column("path").to_pylist()
    runs = batch.column("run_id").to_pylist()
    return np.fromiter((newest.get(p) == r for p, r in zip(paths, runs, strict=True)), bool, len(paths))


def to_vectors(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A ``fixed_size_list<float32>[D]`` column as float32 ``[n, D]``, each row scaled to unit length."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise BitrayError(f"the embedding column is {column.type}, not a fixed-size list of floats")
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return normalise(flat.reshape(-1, dim))


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero), so inner product = cosine similarity."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))
