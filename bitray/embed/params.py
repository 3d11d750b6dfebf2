"""What a run was started with, persisted as ``run.json`` and validated when the run resumes.

A run keeps the settings it started with: resuming it with other flags does not change its model, image
size or manifest, so every row of one run is comparable. The file is written after the manifest, so its
existence marks a run as begun.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from bitray import __version__, storage
from bitray.config import EmbedConfig
from bitray.embed.layout import OutputLayout
from bitray.errors import BitrayError


class ManifestPart(BaseModel):
    """One Parquet file of a run's manifest: rows ``[first_row, first_row + rows)`` of the run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    first_row: int
    rows: int


class InputCounts(BaseModel):
    """What the listing found, against what earlier runs recorded (incremental runs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listed: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    retried: int = 0
    """Recorded errors taken again (``retry_errors``)."""
    deleted: int = 0
    """Recorded objects in the run's inputs that the listing no longer has (``bitray.embed.state``)."""

    @property
    def todo(self) -> int:
        return self.new + self.changed + self.retried


class RunParams(BaseModel):
    """The typed, persisted parameters of one run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    model: str
    """The spec the actors load; a ``models:/NAME@ALIAS`` is recorded as the version it named at the start."""
    model_id: str | None = None
    """The id of the weights the output's rows carry (from its finished runs): actors refuse a model that
    loads as another. None for an output's first run (and runs begun before it was recorded)."""
    image_size: tuple[int, int]
    batch_size: int
    rows_per_file: int
    max_pixels: int | None
    max_bytes: int | None
    max_decode_mb: int = 1200
    decode: Literal["fast", "exact"] = "exact"  # runs begun before the fast decode existed decoded exactly
    actors_min: int
    actors_max: int | None
    gpus_per_actor: float | None
    cpus_per_actor: float | None
    mixed_precision: bool
    cpu_precision: Literal["float32", "bfloat16"] = "float32"
    incremental: bool
    task: Literal["embed", "classify"] = "embed"
    top_k: int = 5
    inputs: list[str]
    """Input prefixes and objects as listed (local paths absolute); runs before ``input_manifest`` existed
    also hold the manifest file here. Reads an index drives stay under these (``bitray.search.scope``)."""
    input_manifest: str | None = None
    """The file of input URIs (``--manifest``) the run listed, if any."""
    counts: InputCounts
    manifest: list[ManifestPart]
    retried: list[ManifestPart] = []
    """Parts of ``runs/<run>/retried/``: the recorded errors this run takes again (``bitray.embed.retry``)."""
    deleted: list[ManifestPart] = []
    """Parts of ``runs/<run>/deleted/``: the recorded paths this incremental run found gone."""
    bitray_version: str = __version__

    @property
    def rows(self) -> int:
        return sum(part.rows for part in self.manifest)

    @classmethod
    def for_run(
        cls,
        config: EmbedConfig,
        run_id: str,
        counts: InputCounts,
        manifest: list[ManifestPart],
        retried: list[ManifestPart] | None = None,
        model_id: str | None = None,
        deleted: list[ManifestPart] | None = None,
    ) -> RunParams:
        return cls(
            run_id=run_id,
            model=config.model,
            model_id=model_id,
            image_size=config.size_hw(),
            batch_size=config.batch_size,
            rows_per_file=config.rows_per_file,
            max_pixels=config.max_pixels,
            max_bytes=config.max_bytes,
            max_decode_mb=config.max_decode_mb,
            decode=config.decode,
            actors_min=config.actors_min,
            actors_max=config.actors_max,
            gpus_per_actor=config.gpus_per_actor,
            cpus_per_actor=config.cpus_per_actor,
            mixed_precision=config.mixed_precision,
            cpu_precision=config.cpu_precision,
            incremental=config.incremental,
            task=config.task,
            top_k=config.top_k,
            inputs=[_absolute(uri) for uri in config.inputs],
            input_manifest=_absolute(config.manifest) if config.manifest else None,
            counts=counts,
            manifest=manifest,
            retried=retried or [],
            deleted=deleted or [],
        )

    def save(self, layout: OutputLayout, *, deadline: float | None = None) -> None:
        data = self.model_dump_json(indent=1).encode()
        storage.write_bytes(layout.params_file(self.run_id), data, layout.storage, deadline=deadline)

    @classmethod
    def load(cls, layout: OutputLayout, run_id: str) -> RunParams:
        params = cls.load_if_begun(layout, run_id)
        if params is None:
            raise BitrayError(f"run {run_id} has no parameters under {layout.output}; it never began")
        return params

    @classmethod
    def load_if_begun(cls, layout: OutputLayout, run_id: str) -> RunParams | None:
        """The run's parameters, or None when it has not begun (one request either way)."""
        uri = layout.params_file(run_id)
        data = storage.read_if_exists(uri, layout.storage)
        if data is None:
            return None
        try:
            params = cls.model_validate_json(data)
        except ValidationError as exc:
            raise BitrayError(
                f"run {run_id}'s parameters {uri} are unreadable ({exc.error_count()} problem(s), first: "
                f"{exc.errors()[0]['msg']}); it was written by another bitray version or edited by hand: "
                "start a new run with another --run-id or --output"
            ) from None
        if params.run_id != run_id:
            raise BitrayError(f"{uri} describes run {params.run_id}, not {run_id}; the output was moved")
        return params

    def differences(self, config: EmbedConfig) -> list[str]:
        """Settings of ``config`` that differ from the run's own (the run keeps its own)."""
        mine = {"model": self.model, "image_size": self.image_size, "batch_size": self.batch_size,
                "rows_per_file": self.rows_per_file, "decode": self.decode}  # fmt: skip
        theirs = {"model": config.model, "image_size": config.size_hw(), "batch_size": config.batch_size,
                  "rows_per_file": config.rows_per_file, "decode": config.decode}  # fmt: skip
        return [f"{key} {mine[key]} (not {theirs[key]})" for key in mine if mine[key] != theirs[key]]


def _absolute(uri: str) -> str:
    """A local path made absolute, as the listing names its files; object-store URIs as they are."""
    return uri if storage.is_remote(uri) else str(storage.local_path(uri))
