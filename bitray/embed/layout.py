"""Where an embedding output keeps its data and its state, and the schemas of its Parquet files.

::

    OUT/embeddings/part-<run>-<uid>.parquet        embeddings: many images per file (``rows_per_file``)
    OUT/predictions/part-<run>-<uid>.parquet       instead of embeddings for a classifier (``task: classify``)
    OUT/errors/part-<run>-<uid>.parquet            one row per image that could not be embedded
    OUT/_bitray/lock                               the output's lock (``bitray.locks``)
    OUT/_bitray/state/current.json                 incremental state: finished runs, recorded versions,
                                                   the settings they share (``bitray.embed.settings``)
    OUT/_bitray/state/base-<n>/part-<k>.parquet    compacted recorded versions, sorted by path
    OUT/_bitray/runs/<run>/manifest/part-<k>.parquet   the run's inputs, sorted by path, numbered rows
    OUT/_bitray/runs/<run>/retried/part-<k>.parquet    recorded errors a retry run takes again
    OUT/_bitray/runs/<run>/run.json                the run's parameters (``RunParams``): marks it begun
    OUT/_bitray/runs/<run>/log/<seq>[-full].json   the commit log (``bitray.embed.commit``)
    OUT/_bitray/runs/<run>/staging/                staged files not committed yet (local and gs://)
    OUT/_bitray/runs/<run>/summary.json            written when every input is accounted for

Readers only ever see files under ``embeddings/`` and ``errors/``, and only committed ones; the ``_``
prefix keeps bitray's state out of pyarrow, pandas and Ray readers of the output prefix.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from bitray import storage
from bitray.config import EmbedConfig, StorageConfig

_VERSION_FIELDS = [
    ("etag", pa.string()),
    ("size", pa.int64()),
    ("mtime", pa.timestamp("ns", tz="UTC")),
    ("run_id", pa.string()),
]
"""Which object version a row is about, and the run that wrote it: in every data file."""
_RESULT_FIELDS = [("model", pa.string()), ("width", pa.int32()), ("height", pa.int32()), *_VERSION_FIELDS]
"""Beside each result: the model id and the image's stored size."""

ERRORS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("stage", pa.string()),  # read / decode / embed
        ("error", pa.string()),  # "Type: message"
        *_VERSION_FIELDS,
    ]
)


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([("path", pa.string()), ("embedding", pa.list_(pa.float32(), dim)), *_RESULT_FIELDS])


def predictions_schema() -> pa.Schema:
    return pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("score", pa.float32()),  # the softmax probability of ``label``
            ("top_k_labels", pa.list_(pa.string())),
            ("top_k_scores", pa.list_(pa.float32())),
            *_RESULT_FIELDS,
        ]
    )


DATA_KINDS = ("embeddings", "predictions", "errors")


def part_name(run_id: str, uid: str) -> str:
    return f"part-{run_id}-{uid}.parquet"


def run_of_part(name: str) -> str | None:
    """The run id in a data file's name (``part-<run>-<uid>.parquet``), or None for another file."""
    if not (name.startswith("part-") and name.endswith(".parquet")):
        return None
    run, sep, _ = name[len("part-") : -len(".parquet")].rpartition("-")
    return run if sep else None


def output_layout(config: EmbedConfig) -> OutputLayout:
    """The layout of ``config.output``: a local path made absolute (Ray workers may run in another
    directory), the storage settings pinned (``resolved_storage``)."""
    output = config.output.rstrip("/")
    if not storage.is_remote(output):
        output = str(storage.local_path(output))
    return OutputLayout(output, resolved_storage(config.storage))


def resolved_storage(config: StorageConfig) -> StorageConfig:
    """Pin the endpoint and region from the driver's environment: Ray workers may not share it."""
    return config.model_copy(
        update={"s3_endpoint": config.resolved_s3_endpoint(), "s3_region": config.resolved_s3_region()}
    )


@dataclass(frozen=True)
class OutputLayout:
    """The URIs of one output prefix."""

    output: str
    storage: StorageConfig

    def data_dir(self, kind: str) -> str:
        return storage.join(self.output, kind)

    def data_file(self, kind: str, run_id: str, uid: str) -> str:
        return storage.join(self.data_dir(kind), part_name(run_id, uid))

    @property
    def state_dir(self) -> str:
        return storage.join(self.output, "_bitray")

    @property
    def lock_uri(self) -> str:
        return storage.join(self.state_dir, "lock")

    @property
    def incremental_dir(self) -> str:
        return storage.join(self.state_dir, "state")

    def run_dir(self, run_id: str) -> str:
        return storage.join(self.state_dir, "runs", run_id)

    def manifest_dir(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), "manifest")

    def retried_dir(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), "retried")

    def deleted_dir(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), "deleted")

    def data_files(self, kind: str, runs: Collection[str] | None = None) -> list[str]:
        """URIs of the committed files under ``OUT/<kind>/``, sorted; only of ``runs`` if given (one LIST
        per 1,000 files)."""
        directory = self.data_dir(kind)
        names = storage.list_names(directory, self.storage)
        return sorted(
            storage.join(directory, name)
            for name in names
            if (run := run_of_part(name)) is not None and (runs is None or run in runs)
        )

    def params_file(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), "run.json")

    def log_dir(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), "log")

    def staging_dir(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), "staging")

    def summary_file(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), "summary.json")

    def run_ids(self) -> list[str]:
        """Every run that has a directory under this output (begun or not): one LIST per 1,000 runs."""
        runs = storage.join(self.state_dir, "runs")
        return [name for name in storage.list_names(runs, self.storage) if not name.startswith(".")]

    def is_begun(self, run_id: str) -> bool:
        return storage.exists(self.params_file(run_id), self.storage)

    def read_summary(self, run_id: str) -> dict[str, Any] | None:
        """The summary of a finished run, or None while it is not finished (one request)."""
        data = storage.read_if_exists(self.summary_file(run_id), self.storage)
        return None if data is None else json.loads(data)

    def write_summary(self, run_id: str, summary: dict[str, Any], *, deadline: float | None = None) -> None:
        write_json(self.summary_file(run_id), summary, self.storage, deadline=deadline)


def write_json(
    uri: str, data: dict[str, Any], storage_config: StorageConfig, *, deadline: float | None = None
) -> None:
    data_bytes = json.dumps(data, indent=1, sort_keys=True).encode()
    storage.write_bytes(uri, data_bytes, storage_config, deadline=deadline)


def read_json(uri: str, storage_config: StorageConfig) -> dict[str, Any]:
    return json.loads(storage.read_bytes(uri, storage_config))
