"""The writer stage: a block of up to ``rows_per_file`` output rows -> staged Parquet files + a receipt.

Result rows become an embeddings file (or, for a classifier, a predictions file).

Ray bundles the actors' small blocks into one batch per call, so each call writes one embeddings file
and, when some rows failed, one errors file, both staged (``bitray.embed.commit``), and returns the
receipt the driver commits. Error rows travel in the same stream as embeddings (null embedding) and are
split off here.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bitray.embed.commit import Receipt, publisher_for
from bitray.embed.layout import ERRORS_SCHEMA, OutputLayout, embeddings_schema, predictions_schema
from bitray.embed.ranges import ranges_of

ROW_GROUP_ROWS = 2048
"""About 16 MB per row group at 2048-d: readers can stream a file in bounded memory."""


def write_memory(rows_per_file: int) -> int:
    """A writer holds its rows and their Parquet bytes (2 x 8 KB per 2048-d row), plus the worker itself."""
    return 2 * rows_per_file * 8 * 2**10 + 192 * 2**20


def write_files(batch: pa.Table, *, layout: OutputLayout, run_id: str) -> pa.Table:
    """Stage the batch's result rows and error rows as Parquet files; one row holding the receipt (JSON)."""
    failed = batch.column("stage").is_valid()
    results = batch.filter(pc.invert(failed))
    if "embedding" in batch.column_names:
        kind, embedded = "embeddings", _embeddings_table(results, run_id)
    else:
        kind, embedded = "predictions", _predictions_table(results, run_id)
    errors = _errors_table(batch.filter(failed), run_id)
    publisher = publisher_for(layout)
    files = [
        publisher.stage(name, run_id, _parquet_bytes(table))
        for name, table in ((kind, embedded), ("errors", errors))
        if table.num_rows
    ]
    models = [m for m in pc.unique(embedded.column("model")).to_pylist() if m] if embedded.num_rows else []
    receipt = Receipt(
        files=files,
        ranges=ranges_of(batch.column("row").to_numpy()),
        embedded=embedded.num_rows,
        errored=errors.num_rows,
        model=", ".join(sorted(models)) or None,
    )
    return pa.table({"receipt": [receipt.model_dump_json()]})


def _embeddings_table(rows: pa.Table, run_id: str) -> pa.Table:
    schema = embeddings_schema(rows.schema.field("embedding").type.list_size)
    if not rows.num_rows:
        return schema.empty_table()
    columns = {"path": rows.column("path"), "embedding": rows.column("embedding").combine_chunks()}
    return pa.table({**columns, **_result_columns(rows, run_id)}, schema=schema)


def _predictions_table(rows: pa.Table, run_id: str) -> pa.Table:
    names = ("path", "label", "score", "top_k_labels", "top_k_scores")
    columns = {name: rows.column(name) for name in names}
    return pa.table({**columns, **_result_columns(rows, run_id)}, schema=predictions_schema())


def _errors_table(rows: pa.Table, run_id: str) -> pa.Table:
    columns = {name: rows.column(name) for name in ("path", "stage", "error")}
    return pa.table({**columns, **_version_columns(rows, run_id)}, schema=ERRORS_SCHEMA)


def _result_columns(rows: pa.Table, run_id: str) -> dict[str, pa.ChunkedArray | pa.Array]:
    return {
        "model": rows.column("model"),
        "width": rows.column("width").cast(pa.int32()),
        "height": rows.column("height").cast(pa.int32()),
        **_version_columns(rows, run_id),
    }


def _version_columns(rows: pa.Table, run_id: str) -> dict[str, pa.ChunkedArray | pa.Array]:
    return {
        "etag": rows.column("etag"),
        "size": rows.column("size"),
        "mtime": _timestamps(rows),
        "run_id": pa.array([run_id] * rows.num_rows, pa.string()),
    }


def _timestamps(rows: pa.Table) -> pa.Array:
    return rows.column("mtime_ns").cast(pa.int64()).cast(pa.timestamp("ns", tz="UTC"))


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_ROWS)
    return buffer.getvalue().to_pybytes()
