"""The on-storage state that makes an embedding run exactly-once: layout, manifest, shard commits, summary.

Layout under the output prefix ``OUT``::

    OUT/embeddings/part-<run>-<shard>.parquet    one file per committed shard that embedded something
    OUT/errors/part-<run>-<shard>.parquet        one file per committed shard that had errors
    OUT/_bitray/lock                             the run lock (see ``bitray.incremental``)
    OUT/_bitray/runs/<run>/manifest.parquet      every input of the run: shard, path, object version
    OUT/_bitray/runs/<run>/run.json              what the run was started with (model spec, image size)
    OUT/_bitray/runs/<run>/commits/<shard>.json  a shard's commit record: written last, after its data
    OUT/_bitray/runs/<run>/summary.json          written when every shard is committed

How a run stays exactly-once: the manifest is written (atomically) before any work, so a restarted run
works on the same inputs in the same shards. A shard's data files have names fixed by (run, shard), are
written whole (atomic rename locally; a single PUT or a completed multipart upload on object stores, never
visible half-written) and then its commit record is written. A restarted run redoes only the shards
without a commit record; redoing a shard overwrites the same file names and deletes a file the new
attempt does not produce, so a path can never be in two files, whatever point a run was killed at. The
``_`` prefix keeps this state out of ``pyarrow.dataset`` and Ray/pandas readers of the data directories.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bitray import storage
from bitray.config import StorageConfig
from bitray.storage import ObjectInfo

MANIFEST_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("path", pa.string()),
        ("version", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
    ]
)


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("path", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("model", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("etag", pa.string()),
            ("size", pa.int64()),
            ("mtime", pa.timestamp("ns", tz="UTC")),
            ("run_id", pa.string()),
        ]
    )


ERRORS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("stage", pa.string()),  # read / decode / embed
        ("error", pa.string()),  # "Type: message"
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.timestamp("ns", tz="UTC")),
        ("run_id", pa.string()),
    ]
)


@dataclass(frozen=True)
class RunLayout:
    """Where one output prefix keeps its data and the state of its runs."""

    output: str
    storage: StorageConfig

    @property
    def embeddings_dir(self) -> str:
        return storage.join(self.output, "embeddings")

    @property
    def errors_dir(self) -> str:
        return storage.join(self.output, "errors")

    @property
    def state_dir(self) -> str:
        return storage.join(self.output, "_bitray")

    def run_dir(self, run_id: str) -> str:
        return storage.join(self.state_dir, "runs", run_id)

    def part_name(self, run_id: str, shard: int) -> str:
        return f"part-{run_id}-{shard:06d}.parquet"

    def embeddings_file(self, run_id: str, shard: int) -> str:
        return storage.join(self.embeddings_dir, self.part_name(run_id, shard))

    def errors_file(self, run_id: str, shard: int) -> str:
        return storage.join(self.errors_dir, self.part_name(run_id, shard))

    def commit_file(self, run_id: str, shard: int) -> str:
        return storage.join(self.run_dir(run_id), "commits", f"{shard:06d}.json")

    def summary_file(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), "summary.json")

    # -- runs ---------------------------------------------------------------------------------------------

    def run_ids(self) -> list[str]:
        """Every run that wrote a manifest under this output, finished or not."""
        runs = storage.join(self.state_dir, "runs")
        return [name for name in storage.list_names(runs, self.storage) if not name.startswith(".")]

    def has_manifest(self, run_id: str) -> bool:
        """A run is begun once its manifest exists (a run killed before that left nothing to finish)."""
        return storage.exists(storage.join(self.run_dir(run_id), "manifest.parquet"), self.storage)

    def is_finished(self, run_id: str) -> bool:
        return storage.exists(self.summary_file(run_id), self.storage)

    def write_run(
        self, run_id: str, objects: list[ObjectInfo], shard_size: int, params: dict[str, Any]
    ) -> None:
        """Record the run's inputs and parameters; the manifest is written last, it marks the run as begun."""
        write_json(storage.join(self.run_dir(run_id), "run.json"), params, self.storage)
        table = pa.table(
            {
                "shard": [i // shard_size for i in range(len(objects))],
                "path": [o.uri for o in objects],
                "version": [o.version for o in objects],
                "etag": [o.etag for o in objects],
                "size": [o.size for o in objects],
                "mtime_ns": [o.mtime_ns for o in objects],
            },
            schema=MANIFEST_SCHEMA,
        )
        write_table(storage.join(self.run_dir(run_id), "manifest.parquet"), table, self.storage)

    def read_manifest(self, run_id: str) -> pa.Table | None:
        uri = storage.join(self.run_dir(run_id), "manifest.parquet")
        if not storage.exists(uri, self.storage):
            return None
        return pq.read_table(io.BytesIO(storage.read_bytes(uri, self.storage)))

    def read_params(self, run_id: str) -> dict[str, Any]:
        return read_json(storage.join(self.run_dir(run_id), "run.json"), self.storage)

    def commits(self, run_id: str) -> dict[int, dict[str, Any]]:
        """Committed shards of a run and their records."""
        commits_dir = storage.join(self.run_dir(run_id), "commits")
        out: dict[int, dict[str, Any]] = {}
        for name in storage.list_names(commits_dir, self.storage):
            if name.endswith(".json") and not name.startswith("."):
                out[int(name.removesuffix(".json"))] = read_json(
                    storage.join(commits_dir, name), self.storage
                )
        return out

    def commit_shard(
        self, run_id: str, shard: int, embedded: pa.Table, errors: pa.Table, model_id: str
    ) -> dict:
        """Make one shard's rows visible, then record it as committed (the order is what makes it safe)."""
        for uri, table in (
            (self.embeddings_file(run_id, shard), embedded),
            (self.errors_file(run_id, shard), errors),
        ):
            if table.num_rows:
                write_table(uri, table, self.storage)
            else:
                storage.delete(uri, self.storage)  # left by an earlier attempt at this shard
        record = {"embedded": embedded.num_rows, "errored": errors.num_rows, "model": model_id}
        write_json(self.commit_file(run_id, shard), record, self.storage)
        return record

    def discard_run(self, run_id: str, manifest: pa.Table) -> None:
        """Remove a run that committed nothing: data files of any shard first, the manifest last."""
        for shard in sorted(set(manifest.column("shard").to_pylist())):
            storage.delete(self.embeddings_file(run_id, shard), self.storage)
            storage.delete(self.errors_file(run_id, shard), self.storage)
        for name in ("manifest.parquet", "run.json"):
            storage.delete(storage.join(self.run_dir(run_id), name), self.storage)

    def write_summary(self, run_id: str, summary: dict[str, Any]) -> None:
        write_json(self.summary_file(run_id), summary, self.storage)

    def read_summary(self, run_id: str) -> dict[str, Any]:
        return read_json(self.summary_file(run_id), self.storage)


def write_table(uri: str, table: pa.Table, storage_config: StorageConfig) -> None:
    """Write a whole Parquet file in one atomic step (see ``storage.write_bytes``)."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue().to_pybytes(), storage_config)


def write_json(uri: str, data: dict[str, Any], storage_config: StorageConfig) -> None:
    storage.write_bytes(uri, json.dumps(data, indent=2, sort_keys=True).encode(), storage_config)


def read_json(uri: str, storage_config: StorageConfig) -> dict[str, Any]:
    return json.loads(storage.read_bytes(uri, storage_config))
