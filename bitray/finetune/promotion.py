"""Promotion on merit: does a new model version take the registry alias from its current holder?

A pure decision (``decide``) over the two versions' validation top-1 and the digests of the validation
sets they were measured on; ``register_and_promote`` gathers the figures from the MLflow registry and
applies it. Scores on different validation sets are not comparable, so under ``if_better`` the alias
then stays where it is (``always`` moves it regardless).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from bitray import tracking
from bitray.model import registry

log = logging.getLogger(__name__)

Policy = Literal["if_better", "always"]


@dataclass(frozen=True)
class Standing:
    """One version's claim: its validation top-1 and the digest of its validation set."""

    version: str
    top1: float | None
    digest: str | None


@dataclass(frozen=True)
class Decision:
    move: bool
    reason: str
    new: Standing
    holder: Standing | None

    def as_tags(self) -> dict[str, str]:
        tags = {
            "bitray.promotion": "moved" if self.move else "kept",
            "bitray.promotion.reason": self.reason,
            "bitray.promotion.new_top1": _figure(self.new.top1),
        }
        if self.holder is not None:
            tags["bitray.promotion.holder_version"] = self.holder.version
            tags["bitray.promotion.holder_top1"] = _figure(self.holder.top1)
        return tags


def decide(policy: Policy, new: Standing, holder: Standing | None) -> Decision:
    """Move the alias to ``new``? ``if_better`` needs a strictly higher top-1 on the same validation set."""
    if policy == "always":
        return Decision(True, "promote: always", new, holder)
    if holder is None:
        return Decision(True, "no version holds the alias yet", new, holder)
    if new.top1 is None:
        return Decision(False, "the new version has no validation top-1 (no validation set)", new, holder)
    if holder.top1 is None or holder.digest is None:
        return Decision(True, f"version {holder.version} has no recorded validation top-1", new, holder)
    if holder.digest != new.digest:
        return Decision(
            False,
            f"version {holder.version} was validated on another set (digest {holder.digest[:12]}), "
            "so the scores are not comparable; use promote: always to move the alias",
            new,
            holder,
        )
    if new.top1 > holder.top1:
        return Decision(True, f"val top-1 {new.top1:.4f} beats {holder.top1:.4f}", new, holder)
    return Decision(False, f"val top-1 {new.top1:.4f} does not beat {holder.top1:.4f}", new, holder)


def _figure(value: float | None) -> str:
    return "none" if value is None else f"{value:.6f}"


def register_and_promote(
    tracking_uri: str,
    run_id: str,
    model_uri: str,
    *,
    registered_model: str,
    alias: str,
    policy: Policy,
    val_top1: float | None,
    val_digest: str | None,
) -> tuple[str, Decision]:
    """Register ``model_uri`` as a new version (tagged with its validation top-1 and set digest); move
    ``alias`` to it when ``decide`` says so. The decision and both figures go to the run's tags."""
    tags = {}
    if val_top1 is not None:
        tags[registry.VAL_TOP1_TAG] = repr(val_top1)
    if val_digest is not None:
        tags[registry.VAL_DIGEST_TAG] = val_digest
    version = registry.register_version(tracking_uri, model_uri, registered_model, tags)
    held = registry.alias_holder(tracking_uri, registered_model, alias)
    holder = None
    if held is not None:
        top1 = held[1].get(registry.VAL_TOP1_TAG)
        holder = Standing(held[0], float(top1) if top1 else None, held[1].get(registry.VAL_DIGEST_TAG))
    decision = decide(policy, Standing(version, val_top1, val_digest), holder)
    if decision.move:
        registry.set_alias(tracking_uri, registered_model, alias, version)
    run_tags = {
        **decision.as_tags(),
        "bitray.registered_model": f"{registry.MODELS_SCHEME}{registered_model}/{version}",
    }
    if decision.move:
        run_tags["bitray.alias"] = f"{registry.MODELS_SCHEME}{registered_model}@{alias}"
    tracking.set_tags(tracking_uri, run_id, run_tags)
    log.info(
        "%s version %s: alias @%s %s (%s)",
        registered_model,
        version,
        alias,
        "moved to it" if decision.move else "kept",
        decision.reason,
    )
    return version, decision
