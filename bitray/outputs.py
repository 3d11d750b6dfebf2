"""What readers of an embedding output may rely on: its finished runs, committed files and run models.

The search layer reads outputs only through these three functions, so the embedding pipeline can change
its on-storage layout by re-implementing their bodies. Today's layout (see ``bitray.ledger``)::

    OUT/embeddings/part-<run_id>-<shard>.parquet   committed rows (likewise OUT/errors/)
    OUT/_bitray/runs/<run_id>/run.json             the run's model spec and image size
    OUT/_bitray/runs/<run_id>/summary.json         written when the run finished
"""

from __future__ import annotations

import json
from collections.abc import Collection

import pyarrow.fs as pafs

# The public signatures name their parameter ``storage``; the module goes by another name here.
from bitray import storage as _storage
from bitray.config import StorageConfig
from bitray.errors import BitrayError

KINDS = ("embeddings", "errors")


def finished_runs(output: str, storage: StorageConfig | None = None) -> list[str]:
    """Run ids of the runs that finished under this embedding output, oldest first.

    Ordered by the time ``summary.json`` was written (then by run id), which is when a run finished.
    """
    runs_dir = _runs_dir(output)
    fs, path = _storage.filesystem_for(runs_dir, storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    except OSError as exc:
        raise BitrayError(f"cannot list the runs of {output!r}: {exc}") from None
    finished: list[tuple[int, str]] = []
    for info in infos:
        parts = info.path[len(path) :].strip("/").split("/")
        if len(parts) == 2 and parts[1] == "summary.json" and not parts[0].startswith("."):
            finished.append((info.mtime_ns or 0, parts[0]))
    return [run for _, run in sorted(finished)]


def committed_files(
    output: str,
    kind: str = "embeddings",
    storage: StorageConfig | None = None,
    runs: Collection[str] | None = None,
) -> list[str]:
    """URIs of the committed Parquet files under OUT/<kind>/ (kind: embeddings|errors), sorted; only of
    ``runs`` if given."""
    if kind not in KINDS:
        raise BitrayError(f"unknown kind {kind!r} of embedding output files; use one of {', '.join(KINDS)}")
    directory = _storage.join(output, kind)
    wanted = None if runs is None else set(runs)
    uris = []
    for name in _storage.list_names(directory, storage):
        if not (name.startswith("part-") and name.endswith(".parquet")):
            continue
        run_id = name.removesuffix(".parquet")[len("part-") :].rsplit("-", 1)[0]
        if wanted is None or run_id in wanted:
            uris.append(_storage.join(directory, name))
    return sorted(uris)


def run_model(output: str, run_id: str, storage: StorageConfig | None = None) -> tuple[str, tuple[int, int]]:
    """(model spec the run embedded with, e.g. 'random:tiny', and its image size (h, w))."""
    uri = _storage.join(_runs_dir(output), run_id, "run.json")
    params = json.loads(_storage.read_bytes(uri, storage))
    height, width = params["image_size"]
    return str(params["model"]), (int(height), int(width))


def _runs_dir(output: str) -> str:
    return _storage.join(output, "_bitray", "runs")
