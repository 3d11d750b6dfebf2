"""The schedule follows the model: when ``models:/NAME@ALIAS`` moves, re-embed the bucket into a new version.

``Backfills.tick`` runs at every tick of ``bitray.schedule.Scheduler`` whose config names a moving spec
(``models:/NAME@ALIAS``). It compares what the alias resolves to now with the model of the output's current
version (``bitray.collection``):

1. **Start.** A new model with no version yet: a version named after it (``bitray-pets-4``) is added in
   state ``backfilling`` and its backfill submitted as its own Ray job: an incremental embedding of the
   config's inputs into ``ROOT/versions/<name>/`` with that model. Both are made once: the version's record
   is created only if absent and the job's submission id (``bitray-backfill-<digest>-<name>-1``) is
   refused by Ray a second time, so two schedulers, or one restarted, never start a version twice. A new
   backfill waits while ``max_concurrent_backfills`` backfill jobs (of any schedule) run on the cluster.
2. **Meanwhile** the cron windows keep the current version up to date with the *current* model
   (``window_model``): new images stay searchable throughout.
3. **Resume.** A backfill job that failed or was stopped is submitted again (``-2``, ``-3``, ...): the run
   is incremental, so it finishes the interrupted run and embeds only what is missing.
4. **Catch-up.** When a job of the version succeeds, one more incremental job brings it level with the
   bucket (what arrived during the backfill); its success makes the version complete.
5. **Promote.** ``bitray.promote``: the version's index, the gate (``gate`` in the config), the switch
   (expecting the version the gate compared against). A failing gate (or one that cannot be evaluated)
   leaves the version complete and unswitched, its reason in the record (``bitray outputs``) and MLflow;
   the schedule does not retry it: ``bitray outputs switch`` lets a person decide.
6. **Abandon.** A version still backfilling when the alias has moved on is stopped and retired (its data
   stays until ``bitray outputs gc``), and the newer model's version starts.

The cost: a backfill is a full re-embed of the bucket. Windows and backfills share the cluster; Ray
schedules both, and ``actors_max`` in the config bounds each job's embedding actors.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from bitray import outputs, testhooks
from bitray.collection import Collection, GateResult, Version, name_for, now
from bitray.config import EmbedConfig
from bitray.embed.settings import resolved_model
from bitray.errors import BitrayError
from bitray.jobs import JobInfo, JobNotFound, Jobs, SubmissionIdTaken
from bitray.promote import Gate, promote

log = logging.getLogger(__name__)

BACKFILL_TAG = "bitray.backfill.version"
"""Job metadata naming the version a backfill job embeds."""


def follows_model(config: EmbedConfig) -> bool:
    """Whether the config's model spec can move (a registry alias)."""
    return config.model.startswith("models:/") and "@" in config.model


@dataclass(frozen=True)
class Step:
    """One thing a backfill tick did, for the scheduler's log."""

    version: str
    outcome: str
    """``started``, ``resubmitted``, ``found`` (a job submitted before, not yet recorded), ``catching up``,
    ``switched``, ``gate failed``, ``abandoned``, ``waiting`` (a limit) or ``failed``."""
    reason: str = ""
    job: str | None = None


class Backfills:
    """The backfills of one scheduled config; see the module doc. Every tick reads storage afresh."""

    def __init__(
        self,
        config: EmbedConfig,
        config_path: str | os.PathLike[str],
        digest: str,
        jobs: Jobs,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.digest = digest
        self.jobs = jobs
        self.env = dict(env or {})
        self.collection = Collection(config.output, config.storage)
        gate = config.gate
        self.gate = Gate(gate.labels, gate.tolerance) if gate is not None else None

    def window_model(self) -> str | None:
        """The model a window must embed with: the current version's (None: no rows yet, the config's)."""
        current = self._current()
        return current[1] if current else None

    def tick(self) -> list[Step]:
        steps: list[Step] = []
        current = self._current()
        if current is None:
            return steps  # nothing embedded yet: the windows make the first version
        wanted = resolved_model(self.config.model)
        backfilling = [v for v in self.collection.versions() if v.record.state == "backfilling"]
        for version in backfilling:
            if version.record.resolved != wanted:
                steps.append(self._abandon(version, wanted))
            else:
                steps.append(self._advance(version, current[0]))
        known = {v.record.resolved for v in self.collection.versions() if v.record.state != "retired"}
        if wanted != current[1] and wanted not in known:
            name = name_for(wanted)
            active = self._running_backfills()
            if len(active) >= self.config.max_concurrent_backfills:
                why = f"backfill job(s) {', '.join(active)} running on the cluster (max_concurrent_backfills)"
                steps.append(Step(name, "waiting", why))
            else:
                steps.append(self._start(name, wanted))
        for step in steps:
            log.info(
                "backfill %s: %s%s", step.version, step.outcome, f": {step.reason}" if step.reason else ""
            )
        return steps

    # -- internals ----------------------------------------------------------------------------------------

    def _current(self) -> tuple[str, str] | None:
        """(name, model) of the current version, or None while it holds no rows."""
        rows, _ = outputs.versions(self.collection.root, self.config.storage)
        for row in rows:
            if row["state"] == "current" and row["model"]:
                return row["name"], row["model"]
        return None

    def _running_backfills(self) -> list[str]:
        """Backfill jobs of any schedule still running on the cluster: the limit is the cluster's."""
        return [j.submission_id for j in self.jobs.list() if BACKFILL_TAG in j.metadata and not j.is_terminal]

    def _start(self, name: str, model: str) -> Step:
        try:
            self.collection.add(name, model=self.config.model, resolved=model)
        except BitrayError:  # made by another scheduler meanwhile: the next tick advances it
            return Step(name, "waiting", "the version was just added by another scheduler")
        return self._submit(name, model, attempt=1, outcome="started")

    def _advance(self, version: Version, current: str) -> Step:
        record = version.record
        info = self._status(record.job) if record.job else None
        if info is not None and not info.is_terminal:
            return Step(version.name, "running", job=record.job)
        attempt = int(record.job.rsplit("-", 1)[1]) if record.job else 0
        if info is None or info.status != "SUCCEEDED":
            why = info.reason if info is not None else "no job yet"
            return self._submit(version.name, record.resolved or "", attempt + 1, "resubmitted", why)
        if not record.caught_up:
            # the backfill (or a resumed one) succeeded: one more incremental pass, then it is level
            return self._submit(
                version.name, record.resolved or "", attempt + 1, "catching up", caught_up=True
            )
        self.collection.update(version.name, state="complete")
        try:
            done = promote(self.collection.root, version.name, gate=self.gate, expect=current,
                           storage_config=self.config.storage)  # fmt: skip
        except BitrayError as exc:  # e.g. no labelled image embedded: recorded, and left to a person
            self.collection.update(version.name, gate=GateResult(passed=False, reason=str(exc), at=now()))
            return Step(version.name, "gate failed", str(exc))
        if done.switched:
            return Step(version.name, "switched", f"from {done.previous}")
        return Step(version.name, "gate failed", done.gate.reason if done.gate else "")

    def _abandon(self, version: Version, wanted: str) -> Step:
        if version.record.job:
            try:
                self.jobs.stop(version.record.job, wait_s=30)
            except BitrayError as exc:
                log.warning("could not stop %s: %s", version.record.job, exc)
        self.collection.update(version.name, state="retired", retired=time.time())
        return Step(version.name, "abandoned", f"the model moved on to {wanted}", version.record.job)

    def _submit(
        self, name: str, model: str, attempt: int, outcome: str, why: str = "", *, caught_up: bool = False
    ) -> Step:
        job = f"bitray-backfill-{self.digest}-{name}-{attempt}"
        version = self.collection.record(name)
        overrides = {"output": self.collection.data_uri(version), "model": model, "incremental": True,
                     "run_id": job, "index": None}  # fmt: skip
        try:
            self.jobs.submit("embed", self.config_path, submission_id=job, env=self.env, overrides=overrides,
                             metadata={BACKFILL_TAG: name})  # fmt: skip
        except SubmissionIdTaken:  # submitted by a scheduler that stopped before recording it: watch it
            outcome, why = "found", f"{job} was already submitted; watching it"
        except BitrayError as exc:
            return Step(name, "failed", f"submission failed: {exc}", job)
        # a scheduler killed here leaves a submitted job its record does not name: the next tick's
        # resubmission of the same id is refused, and it watches that job instead
        testhooks.kill_at(testhooks.SCHEDULER_KILL_AT, "backfill-submitted")
        self.collection.update(name, job=job, **({"caught_up": True} if caught_up else {}))
        return Step(name, outcome, why, job)

    def _status(self, job: str) -> JobInfo:
        try:
            return self.jobs.status(job)
        except JobNotFound as exc:  # the cluster forgot it (a new head): treat as failed, resubmit
            return JobInfo(job, "FAILED", message=str(exc))
