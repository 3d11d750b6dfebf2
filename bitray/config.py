"""Typed configuration: YAML in, validated by pydantic, errors that name the file and the key.

Each pipeline has one config class (a ``Section``). ``load_config`` reads an optional YAML file, applies
command-line overrides on top, and turns pydantic's validation errors into one ``BitrayError``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from bitray.errors import BitrayError

T = TypeVar("T", bound="Section")


class Section(BaseModel):
    """Base of every config block: unknown keys are errors, not silently ignored typos."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    """How to reach object storage. Credentials never live here: they come from the standard chains."""

    s3_endpoint: str | None = None
    """S3-compatible endpoint, e.g. ``http://minio:9000``. Falls back to ``AWS_ENDPOINT_URL_S3`` then
    ``AWS_ENDPOINT_URL`` (pyarrow ignores both, so bitray reads them itself)."""
    s3_region: str | None = None
    """Falls back to ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, then ``us-east-1``."""
    anonymous: bool = False
    """Unsigned requests, for public buckets."""

    def resolved_s3_endpoint(self) -> str | None:
        return (
            self.s3_endpoint
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )

    def resolved_s3_region(self) -> str:
        return (
            self.s3_region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing, unreadable or malformed file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BitrayError(f"config file {file} does not exist; check the path given to --config") from None
    except OSError as exc:
        raise BitrayError(f"config file {file} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BitrayError(f"config file {file} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BitrayError(f"config file {file} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> T:
    """Build ``cls`` from an optional YAML file plus overrides (``None`` values are skipped).

    Overrides are the command-line flags: they win over the file, which wins over the defaults.
    """
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    source = f"config file {path}" if path is not None else "configuration"
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise BitrayError(format_validation_error(source, exc)) from None


def format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"{source} is invalid:"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key; check its spelling against the example configs")
        else:
            lines.append(f"  - {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)
