"""One output, one model: the settings that every run of an output shares, and how a new run takes them.

The rows of an output are only comparable when every run made them the same way: one model (its spec and
the id of the weights it loaded), one image size, one decode, one CPU precision and one task. Readers
rely on it: ``pandas.read_parquet`` reads one vector length, an index holds one model's vectors, and a
search embeds its query image the way the rows were embedded. So an incremental or retry run takes these
settings from the output's finished runs where the config does not give them, and a run that gives
another value is refused, naming both (a later bitray may re-embed an output with a new model, as a new
version of it; until then, another model goes to another output).

A ``models:/NAME@ALIAS`` spec is resolved to ``models:/NAME/<version>`` here, once, when the driver plans
a run: ``run.json`` records the version, and the actors and any resume load that version, so an alias
moved during a run, or between a crash and the resume, cannot mix two versions in one run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from bitray.config import EmbedConfig
from bitray.embed.layout import OutputLayout
from bitray.embed.params import RunParams
from bitray.errors import BitrayError
from bitray.precision import check_cpu_precision

SHARED = ("model", "image_size", "decode", "cpu_precision", "task")
"""The config fields every run of one output shares."""
FLAGS = {"model": "--model", "image_size": "--image-size", "decode": "--decode",
         "cpu_precision": "--cpu-precision", "task": "task (bitray embed or bitray predict)"}  # fmt: skip


class OutputSettings(BaseModel):
    """What every row of an output was made with (recorded in the incremental state)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    model_id: str | None = None
    """The id of the weights the rows carry, e.g. ``bit-tiny@random-init``; None until a run embeds one."""
    image_size: tuple[int, int]
    decode: Literal["fast", "exact"]
    cpu_precision: Literal["float32", "bfloat16"]
    task: Literal["embed", "classify"]

    @classmethod
    def of_run(cls, params: RunParams, model_id: str | None) -> OutputSettings:
        return cls(model=params.model, model_id=model_id, image_size=params.image_size, decode=params.decode,
                   cpu_precision=params.cpu_precision, task=params.task)  # fmt: skip

    def values(self) -> dict[str, Any]:
        return {"model_id": self.model_id, **{name: getattr(self, name) for name in SHARED}}

    def merged(self, other: OutputSettings) -> OutputSettings | None:
        """Both as one (a missing model id taken from the other), or None when they differ."""
        if any(getattr(self, name) != getattr(other, name) for name in SHARED):
            return None
        if None not in (self.model_id, other.model_id) and self.model_id != other.model_id:
            return None
        return self if self.model_id is not None else other


def run_settings(layout: OutputLayout, run_id: str) -> OutputSettings | None:
    """A finished run's settings (``run.json`` and ``summary.json``: two GETs); None for a run that had
    nothing to do, which is no evidence of how the output's rows were made."""
    params = RunParams.load(layout, run_id)
    if not params.rows:
        return None
    summary = layout.read_summary(run_id) or {}
    return OutputSettings.of_run(params, summary.get("model_id"))


def common_settings(output: str, found: Iterable[tuple[str, OutputSettings | None]]) -> OutputSettings | None:
    """The one settings of ``(run, settings)`` pairs; ``BitrayError`` naming the values when they differ."""
    common: OutputSettings | None = None
    seen: dict[tuple, list[str]] = {}
    mixed = False
    for run, settings in found:
        if settings is None:
            continue
        seen.setdefault(tuple(settings.values().items()), []).append(run)
        mixed = mixed or "," in (settings.model_id or "")  # a run whose rows already carry two models
        joined = settings if common is None else common.merged(settings)
        mixed = mixed or joined is None
        common = joined or common
    if mixed:
        raise BitrayError(f"output {output} {_describe_mix(seen)}")
    return common


def _describe_mix(seen: dict[tuple, list[str]]) -> str:
    keys = list(seen)
    names = [name for name, _ in keys[0]]
    varying = [i for i, name in enumerate(names) if len({key[i][1] for key in keys}) > 1] or [0]
    found = "; ".join(
        ", ".join(f"{key[i][0]} {_show(key[i][1])}" for i in varying) + f" (run {', '.join(runs[:3])})"
        for key, runs in seen.items()
    )
    return (
        f"mixes rows made differently: {found}. An output holds one model's rows at one image size, decode "
        "and task (made so by an older bitray); embed each model into its own output and read them apart"
    )


def settle(config: EmbedConfig, layout: OutputLayout, recorded: OutputSettings | None) -> EmbedConfig:
    """The config a new run under ``layout`` must use: ``models:/NAME@ALIAS`` resolved to its version, and
    the output's ``recorded`` settings where the config leaves them at their defaults.

    Raises ``BitrayError`` (one message, both values) when the config gives a value the output's rows were
    not made with. The model id is compared later, by the actors that load the model (``RunParams.model_id``).
    """
    given = config.model_fields_set
    resolved = resolved_model(config.model)  # asked of MLflow once: the alias may move at any time
    if recorded is not None:
        mine = {name: getattr(recorded, name) for name in SHARED}
        asked = {
            **{name: getattr(config, name) for name in SHARED},
            "model": resolved,
            "image_size": config.size_hw(),
        }
        shown = {**asked, "model": config.model + (f" (now {resolved})" if resolved != config.model else "")}
        refused = [
            f"{FLAGS[name]} {_show(shown[name])} (the output's rows were made with {_show(mine[name])})"
            for name in SHARED
            if name in given and asked[name] != mine[name]
        ]
        if refused:
            raise BitrayError(
                f"output {layout.output} holds one model's rows at one image size, decode and task, and this "
                f"run asks for another: {'; '.join(refused)}. Leave the setting out to take the output's, "
                "or embed into another --output"
            )
        asked.update({name: mine[name] for name in SHARED if name not in given})
        config = config.model_copy(update=asked)
    else:
        config = config.model_copy(update={"model": resolved})
    check_cpu_precision(config.cpu_precision, config.model)
    return config


def resolved_model(spec: str) -> str:
    """``models:/NAME@ALIAS`` as ``models:/NAME/<version>`` (the version the alias names now, asked of
    MLflow's registry); any other spec as it is."""
    if not spec.startswith("models:/") or "@" not in spec:
        return spec
    from bitray.model.registry import registered_version

    return registered_version(spec)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(map(str, value)) + " px"
    return str(value)
