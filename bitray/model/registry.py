"""The MLflow model registry: register a fine-tuned model's version, move and read aliases, and resolve
``models:/`` URIs to a version or to a local SavedModel.

A registered bitray model is the pyfunc of ``bitray.model.pyfunc``: two SavedModel artifacts,
``feature_vector`` (for embedding) and ``classifier``. Resolving a URI reads the pyfunc's ``MLmodel`` file
only; nothing is unpickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from bitray.errors import BitrayError
from bitray.mlflow_client import client, quick_failures
from bitray.redaction import redacted

MODELS_SCHEME = "models:/"
FEATURE_VECTOR = "feature_vector"
CLASSIFIER = "classifier"
VAL_TOP1_TAG = "bitray.val_top1"
VAL_DIGEST_TAG = "bitray.val_digest"


def register_version(tracking_uri: str, model_uri: str, name: str, tags: Mapping[str, str]) -> str:
    """Register ``model_uri`` as a new version of ``name`` with ``tags``; returns the version."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    version = str(mlflow.register_model(model_uri, name).version)
    server = client(tracking_uri)
    for key, value in tags.items():
        server.set_model_version_tag(name, version, key, value)
    return version


def alias_holder(tracking_uri: str, name: str, alias: str) -> tuple[str, dict[str, str]] | None:
    """``(version, tags)`` of the version ``name@alias`` points at, or ``None``."""
    from mlflow.exceptions import MlflowException

    try:
        held = client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException:  # no such alias (or no such model) yet
        return None
    return str(held.version), dict(held.tags)


def registered_version(uri: str) -> str:
    """``models:/NAME@ALIAS`` as ``models:/NAME/<version>``, the version the alias points at now, asked of
    MLflow's own tracking URI (``MLFLOW_TRACKING_URI``), as ``resolve_registered_model`` loads it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name, _, alias = uri.removeprefix(MODELS_SCHEME).rpartition("@")
    if not uri.startswith(MODELS_SCHEME) or not name or not alias:
        raise BitrayError(f"{uri!r} is not a registered model alias; write models:/<name>@<alias>")
    quick_failures()
    try:
        held = client(mlflow.get_tracking_uri()).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise BitrayError(
            f"cannot resolve {uri!r} in MLflow ({exc.message}); check MLFLOW_TRACKING_URI and the name/alias"
        ) from None
    except Exception as exc:  # connection errors, sqlalchemy
        raise BitrayError(f"cannot resolve {uri!r} in MLflow ({exc}); check MLFLOW_TRACKING_URI") from None
    return f"{MODELS_SCHEME}{name}/{held.version}"


def set_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    client(tracking_uri).set_registered_model_alias(name, alias, version)


def resolve_registered_model(uri: str, part: str = FEATURE_VECTOR, dst: Path | None = None) -> Path:
    """A local SavedModel dir for ``models:/<name>@<alias>`` (or ``models:/<name>/<version>``).

    ``part`` is ``feature_vector`` (for embedding) or ``classifier``. The tracking URI is MLflow's own
    (``MLFLOW_TRACKING_URI``). This is what ``load_model`` calls for ``models:/`` specs.
    """
    import mlflow.artifacts
    import yaml

    if not uri.startswith(MODELS_SCHEME):
        raise BitrayError(f"{uri!r} is not a registered model URI; write models:/<name>@<alias>")
    try:
        fetched = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None)
        local = Path(fetched)
    except Exception as exc:
        raise BitrayError(
            f"cannot fetch {uri!r} from MLflow ({redacted(exc)}); check MLFLOW_TRACKING_URI and the "
            "name/alias"
        ) from None
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    artifacts = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if part not in artifacts:
        raise BitrayError(f"{uri!r} is not a bitray fine-tuned model (no {part!r} artifact)")
    return local / artifacts[part]["path"]
