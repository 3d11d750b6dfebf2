"""What readers of an embedding output may rely on: its finished runs, committed files and run models.

The search layer reads outputs only through these functions; the layout itself is the embedding
pipeline's business (``bitray.embed.layout``). Every file under ``OUT/embeddings/`` and ``OUT/errors/``
is committed (the pipeline publishes nothing else there) and names its run: ``part-<run>-<uid>.parquet``.

Every function takes an output or a collection root (``bitray.collection``): a root is read through its
current version (``data_path``, one GET), so a reader follows a switch at once. A caller making several
calls that must see one version resolves ``data_path`` once and passes the version's path.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

from bitray import collection
from bitray.collection import current_data
from bitray.config import EmbedConfig, StorageConfig
from bitray.embed import retry, state
from bitray.embed.layout import DATA_KINDS, OutputLayout, output_layout
from bitray.embed.params import RunParams
from bitray.embed.settings import OutputSettings
from bitray.embed.state import IncrementalState, recorded_settings
from bitray.errors import BitrayError

__all__ = [
    "OutputSettings",
    "committed_files",
    "data_path",
    "deleted_paths",
    "finished_runs",
    "open_errors",
    "run_model",
    "settings",
]


def data_path(output: str, storage: StorageConfig | None = None) -> str:
    """The path whose files hold ``output``'s rows: a collection's current version, else ``output``."""
    return current_data(output, storage)


def _layout(output: str, storage: StorageConfig | None, *, follow: bool = True) -> OutputLayout:
    """The layout of ``output``'s data: its current version's when ``follow`` (readers), else its own."""
    data = data_path(output, storage) if follow else output
    return output_layout(EmbedConfig(output=data, storage=storage or StorageConfig()))


def finished_runs(output: str, storage: StorageConfig | None = None) -> list[str]:
    """Run ids of the runs that finished under this embedding output, oldest first (one GET)."""
    return list(IncrementalState.load(_layout(output, storage)).finished)


def committed_files(
    output: str,
    kind: str = "embeddings",
    storage: StorageConfig | None = None,
    runs: Collection[str] | None = None,
) -> list[str]:
    """URIs of the committed Parquet files under OUT/<kind>/ (kind: embeddings|errors), sorted; only of
    ``runs`` if given. One LIST per 1,000 files."""
    if kind not in DATA_KINDS:
        choices = ", ".join(DATA_KINDS)
        raise BitrayError(f"unknown kind {kind!r} of embedding output files; use one of {choices}")
    return _layout(output, storage).data_files(kind, None if runs is None else set(runs))


def deleted_paths(output: str, run_id: str, storage: StorageConfig | None = None) -> Iterator[str]:
    """The paths whose objects the incremental run ``run_id`` found gone (recorded by an earlier run, in
    its inputs, no longer listed), sorted and streamed a part (8,192 paths) at a time. A path deleted and
    later restored is embedded again (``new``) by the run that lists it again."""
    layout = _layout(output, storage)
    return state.deleted_paths(layout, RunParams.load(layout, run_id))


def run_model(output: str, run_id: str, storage: StorageConfig | None = None) -> tuple[str, tuple[int, int]]:
    """(model spec the run embedded with, e.g. 'random:tiny', and its image size (h, w))."""
    params = RunParams.load(_layout(output, storage), run_id)
    return params.model, params.image_size


@dataclass(frozen=True)
class RecordedInputs:
    """What the finished runs of an output were started on: where its rows' paths may come from."""

    prefixes: list[str]
    """Input prefixes and single objects (local paths absolute, as the listing names files)."""
    manifests: list[str]
    """Files of input URIs (``--manifest``): their lines are inputs too."""
    max_bytes: int | None
    """The largest ``max_bytes`` a run read with; None when some run had no cap."""


def recorded_inputs(output: str, storage: StorageConfig | None = None) -> RecordedInputs:
    """The inputs of the output's finished runs, from their ``run.json`` (one GET per run)."""
    layout = _layout(output, storage)
    prefixes: list[str] = []
    manifests: list[str] = []
    caps: list[int | None] = []
    for run_id in IncrementalState.load(layout).finished:
        params = RunParams.load(layout, run_id)
        prefixes += params.inputs
        manifests += [params.input_manifest] if params.input_manifest else []
        caps.append(params.max_bytes)
    max_bytes = None if None in caps else max(caps, default=None)
    return RecordedInputs(sorted(set(prefixes)), sorted(set(manifests)), max_bytes)


def settings(output: str, storage: StorageConfig | None = None) -> OutputSettings | None:
    """The model spec and id, image size, decode, CPU precision and task every row of the output was made
    with (None before a run embedded anything). ``BitrayError`` for an output whose runs made their rows
    differently (an older bitray allowed it): such rows cannot be read as one set."""
    layout = _layout(output, storage)
    return recorded_settings(layout, IncrementalState.load(layout))


def open_errors(output: str, storage: StorageConfig | None = None) -> list[retry.OpenError]:
    """Object versions whose latest result is an error row: what ``bitray embed --retry-errors`` takes."""
    layout = _layout(output, storage)
    return retry.open_errors(layout, IncrementalState.load(layout))


def counts(output: str, storage: StorageConfig | None = None, *, follow: bool = True) -> tuple[int, int]:
    """(rows embedded by the finished runs, object versions whose latest result is an error): one GET per
    finished run. An image re-embedded after it changed counts once per run that embedded it."""
    layout = _layout(output, storage, follow=follow)
    state = IncrementalState.load(layout)
    if not state.finished:
        return 0, 0
    rows = sum((layout.read_summary(run) or {}).get("embedded", 0) for run in state.finished)
    return rows, len(retry.open_errors(layout, state))


def versions(root: str, storage: StorageConfig | None = None) -> tuple[list[dict], str | None]:
    """The versions of a collection root (``bitray.collection``; an output made before collections is one
    version, ``v0``) as rows of name, state, model, model id, images, errors, gate and data path; and the
    current version's data path (None when no version is current). Each version is read at its own data
    path: v0's is ROOT itself, which readers of ROOT follow to the current version."""
    rows = []
    current = None
    for version in collection.Collection(root, storage).versions():
        layout = _layout(version.uri, storage, follow=False)
        found = recorded_settings(layout, IncrementalState.load(layout))
        images, errors = counts(version.uri, storage, follow=False)
        record = version.record
        rows.append(
            {
                "name": version.name,
                "state": version.state,
                "model": record.resolved or record.model or (found.model if found else None),
                "model_id": found.model_id if found else record.model_id,
                "images": images,
                "errors": errors,
                "gate": record.gate.model_dump() if record.gate else None,
                "data": version.uri,
            }
        )
        current = version.uri if version.current else current
    return rows, current
