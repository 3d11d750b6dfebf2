"""Make a version of a collection current: index it, gate it on quality, then switch (``bitray.collection``).

The order is the promise. The version's index is built (or brought up to date) first, at its own
``versions/<name>/_index``, so the moment the pointer moves, ``bitray search ROOT`` finds an index of the
new model's vectors. The gate comes next: with ``Gate(labels, tolerance)``, ``bitray evaluate``'s metrics
(``bitray.search.evaluate``) of the new version and of the current one, on the labelled images both hold,
must not be lower by more than ``tolerance`` for any metric; a failing gate leaves the pointer where it was,
records the reason in the version's record (printed by ``bitray outputs``) and logs it to MLflow
(experiment ``bitray-embed``). Only then the one conditional write of the switch, expecting the version the
gate compared against, so a switch made meanwhile by someone else is not silently overwritten.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from bitray import outputs
from bitray.collection import Collection, GateResult, SwitchConflict, Version, now
from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.redaction import redacted

log = logging.getLogger(__name__)

EXPERIMENT = "bitray-embed"


@dataclass(frozen=True)
class Gate:
    labels: str
    """``path,label`` CSV/Parquet or class folders, as ``bitray evaluate --labels``."""
    tolerance: float = 0.01
    tracking_uri: str | None = None


@dataclass(frozen=True)
class Promotion:
    version: str
    switched: bool
    previous: str | None
    index: str | None
    """The version's index URI, None for a version without embeddings (a classifier's predictions)."""
    gate: GateResult | None


def promote(
    root: str,
    name: str,
    *,
    gate: Gate | None = None,
    expect: str | None = None,
    storage_config: StorageConfig | None = None,
) -> Promotion:
    """Index ``name``, gate it against the current version (when ``gate``), and switch to it if it passed.

    ``expect``: the version the caller believes current (``SwitchConflict`` otherwise). The version is
    marked complete first: promoting says its data is whole."""
    collection = Collection(root, storage_config)
    target = _version(collection, name)
    current = collection.current()
    if current is not None and current.name == name:
        raise BitrayError(f"version {name!r} is already the current version of {collection.root}")
    if expect is not None and (current.name if current else None) != expect:
        raise SwitchConflict(
            f"{collection.root}: the current version is {current.name if current else 'none'}, not "
            f"{expect!r} as expected; nothing switched: check bitray outputs {collection.root}"
        )
    if target.record.state == "backfilling":
        collection.update(name, state="complete")
    index = index_version(target, storage_config)
    result = None
    if gate is not None:
        result = check_gate(target, current, gate, storage_config)
        collection.update(name, gate=result)
        if not result.passed:
            return Promotion(name, False, current.name if current else None, index, result)
    collection.switch(name, expect=current.name if current else None)
    return Promotion(name, True, current.name if current else None, index, result)


def index_version(version: Version, storage_config: StorageConfig | None = None) -> str | None:
    """Build or update the version's own index (``<data>/_index``); its URI, or None when the version holds
    no embeddings to index."""
    from bitray.search.index import default_index_uri, update_index

    if version.record.data == ".":  # ROOT's own data: ROOT now reads as the current version; its index
        return default_index_uri(version.uri)  # was kept up to date while it was current
    settings = outputs.settings(version.uri, storage_config)
    if settings is None or settings.task != "embed":
        return None
    update_index(version.uri, storage_config=storage_config)
    return default_index_uri(version.uri)


def check_gate(
    new: Version, current: Version | None, gate: Gate, storage_config: StorageConfig | None = None
) -> GateResult:
    """``bitray evaluate`` of ``new`` against ``current`` on ``gate.labels``; logged to MLflow."""
    from bitray.search.evaluate import evaluate_pair
    from bitray.search.evaluate import gate as compare

    if current is None:
        return GateResult(passed=True, reason="no current version to compare with", at=now())
    if new.record.data == ".":
        raise BitrayError(
            f"version {new.name} is ROOT's own data, which reads as the current version {current.name} now; "
            "it cannot be gated: switch back to it without --labels"
        )
    new_eval, base_eval = evaluate_pair(new.uri, current.uri, gate.labels, storage_config=storage_config)
    passed, rows = compare(new_eval, base_eval, gate.tolerance)
    worse = [row for row in rows if row.delta < -gate.tolerance]
    if passed:
        reason = f"no metric lower than {current.name}'s by more than {gate.tolerance}"
    else:
        reason = (
            "; ".join(
                f"{row.metric} {row.new:.4f} < {current.name}'s {row.baseline:.4f} by {-row.delta:.4f}"
                for row in worse
            )
            + f" (tolerance {gate.tolerance})"
        )
    result = GateResult(
        passed=passed, reason=reason, at=now(), metrics=new_eval.metrics, baseline=base_eval.metrics
    )
    _log(new, current, gate, result)
    return result


def _version(collection: Collection, name: str) -> Version:
    found = next((v for v in collection.versions() if v.name == name), None)
    if found is None:
        collection.record(name)  # raises, naming the versions there are
        raise BitrayError(f"{collection.root} has no version {name!r}")
    return found


def _log(new: Version, current: Version, gate: Gate, result: GateResult) -> None:
    """One MLflow run per gate in experiment ``bitray-embed``; a tracking failure costs a warning only."""
    from mlflow import MlflowClient

    from bitray.mlflow_client import ensure_experiment, quick_failures

    tracking = gate.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    quick_failures()
    try:
        client = MlflowClient(tracking_uri=tracking)
        run = client.create_run(ensure_experiment(client, EXPERIMENT), run_name=f"gate-{new.name}")
        run_id = run.info.run_id
        params = {"version": new.name, "data": new.uri, "baseline_version": current.name,
                  "labels": gate.labels, "tolerance": gate.tolerance}  # fmt: skip
        for key, value in params.items():
            client.log_param(run_id, key, value)
        for key, value in result.metrics.items():
            client.log_metric(run_id, key, value)
        for key, value in result.baseline.items():
            client.log_metric(run_id, f"baseline/{key}", value)
        client.set_tag(run_id, "bitray.gate", "pass" if result.passed else "fail")
        client.set_tag(run_id, "bitray.gate.reason", result.reason)
        client.set_terminated(run_id)
    except Exception as exc:  # MLflow raises many types; none may decide the gate
        log.warning("could not log the gate to MLflow at %s: %s", redacted(tracking), redacted(exc))
