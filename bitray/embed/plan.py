"""Planning a run on the driver: list the inputs, compare with what earlier runs recorded, write the manifest.

Everything streams: objects flow from the listers through the incremental diff into manifest parts, so the
driver's memory does not depend on the bucket's size. ``dry_run`` walks the same path and writes nothing.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from bitray import storage
from bitray.config import EmbedConfig, StorageConfig
from bitray.embed.fence import Fence
from bitray.embed.layout import OutputLayout
from bitray.embed.manifest import ManifestWriter, listed_inputs
from bitray.embed.params import InputCounts, RunParams
from bitray.embed.retry import open_errors
from bitray.embed.settings import settle
from bitray.embed.state import IncrementalState, Status, diff, recorded_settings, recorded_versions
from bitray.errors import BitrayError
from bitray.storage import ObjectInfo
from bitray.storage.listing import matches

ROW_OVERHEAD_BYTES = 200
"""Parquet bytes per embedding row beside the vector itself (path, etag, model id, ...), roughly."""


def start_run(
    config: EmbedConfig,
    layout: OutputLayout,
    run_id: str,
    state: IncrementalState,
    fence: Fence | None = None,
) -> RunParams:
    """List and diff the inputs, write the manifest of what is to do, then ``run.json`` (the run is begun),
    each write inside the lock's ``fence`` when given: a run begun by a driver that lost the lock would be
    resumed by the next one, inputs that the taker embedded meanwhile with it.

    The run takes the output's settings where ``config`` leaves them out, and is refused when it gives
    others (``bitray.embed.settings``)."""
    recorded = recorded_settings(layout, state)
    config = settle(config, layout, recorded)
    writer = ManifestWriter(layout.manifest_dir(run_id), layout.storage, fence)
    retried = ManifestWriter(layout.retried_dir(run_id), layout.storage, fence)
    deleted = ManifestWriter(layout.deleted_dir(run_id), layout.storage, fence)
    counts: Counter[str] = Counter()
    for obj, status in _statuses(config, layout, state):
        counts[status] += 1
        if status == "deleted":
            deleted.add(obj)
        elif status != "unchanged":
            writer.add(obj)
        if status == "retried":
            retried.add(obj)
    counted = _input_counts(counts)
    # an empty listing is a mistake, not the deletion of everything; a retry with no open errors is a run
    # with nothing to do
    if not counted.listed and not config.retry_errors:
        raise BitrayError(_nothing_found(config))
    model_id = recorded.model_id if recorded is not None else None
    params = RunParams.for_run(
        config, run_id, counted, writer.close(), retried.close(), model_id, deleted.close()
    )
    if fence is None:
        params.save(layout)
    else:
        fence.call(lambda deadline: params.save(layout, deadline=deadline))
    return params


@dataclass(frozen=True)
class DryRun:
    """What a run would do, found without writing anything or starting Ray."""

    output: str
    model: str
    incremental: bool
    counts: InputCounts
    rows_per_file: int
    feature_dim: int | None
    unfinished_runs: list[str]
    refused: str | None

    @property
    def files(self) -> int:
        return math.ceil(self.counts.todo / self.rows_per_file)

    @property
    def estimated_bytes(self) -> int | None:
        if self.feature_dim is None:
            return None
        return self.counts.todo * (4 * self.feature_dim + ROW_OVERHEAD_BYTES)

    def to_dict(self) -> dict:
        return {**asdict(self), "counts": self.counts.model_dump(), "files": self.files,
                "estimated_bytes": self.estimated_bytes}  # fmt: skip


def dry_run(config: EmbedConfig, layout: OutputLayout, state: IncrementalState, runs: list[str]) -> DryRun:
    if config.incremental or config.retry_errors:  # a plain run into a used output is refused anyway
        config = settle(config, layout, recorded_settings(layout, state))
    counts: Counter[str] = Counter(status for _, status in _statuses(config, layout, state))
    if not _input_counts(counts).listed and not config.retry_errors:
        raise BitrayError(_nothing_found(config))
    unfinished = [r for r in runs if r not in state.finished]
    refused = None
    if not (config.incremental or config.retry_errors) and runs and config.run_id not in runs:
        refused = f"the output already holds run(s) {', '.join(runs[:3])}: a plain run would be refused"
    return DryRun(
        output=layout.output,
        model=config.model,
        incremental=config.incremental,
        counts=_input_counts(counts),
        rows_per_file=config.rows_per_file,
        feature_dim=feature_dim_of(config.model),
        unfinished_runs=unfinished,
        refused=refused,
    )


def _statuses(
    config: EmbedConfig, layout: OutputLayout, state: IncrementalState
) -> Iterator[tuple[ObjectInfo, Status]]:
    """Each input with its status: listed and diffed, and/or the output's open errors (``retried``)."""
    if config.retry_errors and not config.incremental:  # the recorded errors are the inputs: no listing
        return ((row.object, "retried") for row in open_errors(layout, state))
    listed = listed_inputs(config, layout.storage)
    recorded = recorded_versions(layout, state) if config.incremental else iter(())
    statuses = diff(listed, recorded, in_inputs(config, layout.storage) if config.incremental else None)
    if not (config.retry_errors and state.finished):  # a first scheduled run has nothing to retry yet
        return statuses
    retry = {(row.object.uri, row.object.version) for row in open_errors(layout, state)}
    return ((o, "retried" if s == "unchanged" and (o.uri, o.version) in retry else s) for o, s in statuses)


def in_inputs(config: EmbedConfig, storage_config: StorageConfig) -> Callable[[str], bool]:
    """Whether a path is one the run's listing covers: under one of its input prefixes or manifest lines
    (the path itself or a parent "directory" of it is one), with one of its extensions. An object that is
    not listed although covered is deleted; one outside is merely not an input of this run."""
    uris = list(config.inputs)
    if config.manifest:
        text = storage.read_bytes(config.manifest, storage_config).decode("utf-8")
        lines = (line.strip() for line in text.splitlines())
        uris += [line for line in lines if line and not line.startswith("#")]
    uris = {(uri if storage.is_remote(uri) else str(storage.local_path(uri))).rstrip("/") for uri in uris}

    def covered(path: str) -> bool:
        if not matches(path.rsplit("/", 1)[-1], config.extensions):
            return False
        head = path
        while head and not head.endswith(":/"):
            if head in uris:
                return True
            head = head.rsplit("/", 1)[0] if "/" in head else ""
        return False

    return covered


def _input_counts(counts: Counter[str]) -> InputCounts:
    return InputCounts(
        listed=sum(counts.values()) - counts["deleted"],
        deleted=counts["deleted"],
        new=counts["new"],
        changed=counts["changed"],
        unchanged=counts["unchanged"],
        retried=counts["retried"],
    )


def _nothing_found(config: EmbedConfig) -> str:
    where = ", ".join(config.inputs) or config.manifest
    return (
        f"no images found under {where} (extensions {', '.join(config.extensions or ['any'])}); "
        "check the input prefix and the extensions filter"
    )


def feature_dim_of(spec: str) -> int | None:
    """The embedding size a model spec gives, when its name says the architecture (no weights loaded)."""
    found = re.search(r"(r\d+x\d+|tiny)", spec.lower())
    if found is None:
        return None
    from bitray.model.bit import VARIANTS

    variant = VARIANTS.get(found[1])
    return variant.feature_dim if variant else None
