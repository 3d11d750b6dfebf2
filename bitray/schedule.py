"""``bitray schedule``: one incremental embedding job per cron window, each window at most once.

How a window is never run twice: its Ray submission id is a function of the config and the window's start
(``bitray-embed-<config digest>-<start, UTC>``) and Ray refuses an id it has seen, so even a scheduler that
lost its state cannot submit a window again. The job embeds with ``incremental: true`` and ``run_id`` set to
that id, so its summary is found under the output afterwards, and the incremental run lock keeps any two
runs over one output from working at the same time.

Each ``tick`` (called by ``run_forever``, or directly by tests with an injected clock):

1. collects the result of the job it submitted last, once that job has ended;
2. lists the cron windows that started since the last tick. A window whose start is at most ``grace``
   ago is *current*; older ones were *missed* (the scheduler was not running) and follow the catch-up
   policy: ``skip`` (default) drops them, ``latest`` runs the newest one when there is no current window,
   ``all`` queues every one and runs them in order, one job at a time;
3. submits at most one window. A window that finds the previous job still running is skipped.

With a ``models:/NAME@ALIAS`` model, each tick also advances the backfills of the versions the alias moved
to (``bitray.backfill``), and windows embed into the output's current version with its model until the
switch.

Every window's outcome (submitted, skipped and why, then succeeded/failed with the run's counts) goes to the
scheduler's log and to MLflow, one run per window in experiment ``bitray-embed``. The state (last window
seen, the running job, the catch-up queue) lives in one JSON file (``--state``, local or object store).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from croniter import croniter

from bitray import storage
from bitray.backfill import Backfills, follows_model
from bitray.collection import following
from bitray.config import EmbedConfig, load_config
from bitray.embed.layout import output_layout
from bitray.errors import BitrayError
from bitray.jobs import JobInfo, JobNotFound, Jobs, SubmissionIdTaken, config_digest
from bitray.redaction import redacted

log = logging.getLogger(__name__)

CatchUp = Literal["skip", "latest", "all"]
CATCH_UP_POLICIES: tuple[str, ...] = ("skip", "latest", "all")
EXPERIMENT = "bitray-embed"
MAX_WINDOWS_PER_TICK = 500
"""Windows listed at once after a long outage; older ones are reported as one skipped range."""
ID_TIME_FORMAT = "%Y%m%dT%H%M%SZ"


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_cron(expr: str) -> str:
    if not croniter.is_valid(expr):
        raise BitrayError(
            f"--cron {expr!r} is not a valid cron expression; use five fields, e.g. '*/15 * * * *' "
            "(every 15 minutes, UTC), or six with seconds last"
        )
    return expr


def windows_between(cron: str, after: datetime, until: datetime) -> list[datetime]:
    """Cron fire times ``t`` with ``after < t <= until`` (UTC), oldest first."""
    it = croniter(cron, after)
    out: list[datetime] = []
    while True:
        t = it.get_next(datetime)
        if t > until:
            return out
        out.append(t)


@dataclass
class ScheduleState:
    """What survives a scheduler restart."""

    last_window: str | None = None
    """Start (ISO, UTC) of the newest window already handled."""
    active_id: str | None = None
    """Submission id of the last job submitted; it may still run."""
    active_window: str | None = None
    active_mlflow_run: str | None = None
    pending: list[str] = field(default_factory=list)
    """Missed windows queued by the ``all`` policy, oldest first."""

    @classmethod
    def load(cls, uri: str) -> ScheduleState:
        if not storage.exists(uri):
            return cls()
        try:
            return cls(**json.loads(storage.read_bytes(uri)))
        except (ValueError, TypeError) as exc:
            raise BitrayError(
                f"schedule state {uri} is unreadable ({exc}); move it away to start afresh "
                "(windows already submitted still never run twice: Ray refuses their ids)"
            ) from None

    def save(self, uri: str) -> None:
        storage.write_bytes(uri, json.dumps(asdict(self), indent=2).encode())


@dataclass(frozen=True)
class WindowEvent:
    """One thing that happened to a window: what the log and MLflow record."""

    window: datetime
    outcome: str
    """``submitted``, ``skipped``, ``succeeded``, ``failed`` or ``stopped``."""
    reason: str = ""
    submission_id: str | None = None
    counts: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """What one tick decided, before talking to the cluster (a pure function of state and time)."""

    run: datetime | None
    skipped: list[tuple[datetime, str]]
    pending: list[datetime]


def plan_windows(
    due: list[datetime],
    pending: list[datetime],
    now: datetime,
    *,
    policy: CatchUp,
    grace: timedelta,
    job_running: str | None,
) -> Plan:
    """Decide which window (if any) runs now, which are skipped and why, and what stays queued."""
    current = [w for w in due if now - w <= grace]
    missed = [w for w in due if now - w > grace]
    skipped: list[tuple[datetime, str]] = [
        (w, "superseded: a newer window started before this one could run") for w in current[:-1]
    ]
    current_window = current[-1] if current else None
    queue = list(pending)
    if policy == "skip":
        skipped += [
            (w, "missed: the scheduler was not running when it started (catch-up: skip)") for w in missed
        ]
    elif policy == "latest":
        if current_window is not None or not missed:
            skipped += [(w, "missed; the current window runs instead (catch-up: latest)") for w in missed]
        else:
            skipped += [
                (w, "missed; only the newest missed window runs (catch-up: latest)") for w in missed[:-1]
            ]
            current_window = missed[-1]
    else:
        queue += missed

    if job_running is not None:
        if current_window is not None:
            skipped.append((current_window, f"the previous job {job_running} is still running"))
        return Plan(run=None, skipped=skipped, pending=queue)
    if queue:
        if current_window is not None:
            queue.append(current_window)  # `all`: every window runs, in order
        return Plan(run=queue[0], skipped=skipped, pending=queue[1:])
    return Plan(run=current_window, skipped=skipped, pending=[])


class WindowLog:
    """One MLflow run per window in experiment ``bitray-embed``, plus the scheduler's own log.

    MLflow must be reachable when the scheduler starts; afterwards a tracking failure costs a warning,
    never a window (the scheduler's log line is written first either way).
    """

    def __init__(self, tracking_uri: str | None, experiment: str = EXPERIMENT) -> None:
        from mlflow import MlflowClient

        from bitray.mlflow_client import ensure_experiment, quick_failures

        quick_failures()
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            self.experiment_id = ensure_experiment(self.client, experiment)
        except Exception as exc:  # any MLflow/HTTP/DB error means "unusable"
            raise BitrayError(
                f"cannot use MLflow tracking at {redacted(self.client.tracking_uri)}: {redacted(exc)}; "
                "check --tracking-uri "
                "or MLFLOW_TRACKING_URI"
            ) from None

    def record(self, event: WindowEvent, tags: Mapping[str, str], run_id: str | None = None) -> str | None:
        """Log ``event``; a ``run_id`` from an earlier event of the same window updates that run."""
        line = f"window {event.window.isoformat()}: {event.outcome}"
        if event.submission_id:
            line += f" ({event.submission_id})"
        if event.reason:
            line += f": {event.reason}"
        if event.counts:
            line += " " + " ".join(f"{k}={v:g}" for k, v in sorted(event.counts.items()))
        log.info(line)
        try:
            return self._to_mlflow(event, tags, run_id)
        except Exception as exc:  # tracking never stops scheduling
            log.warning("could not log window %s to MLflow: %s", event.window.isoformat(), exc)
            return run_id

    def _to_mlflow(self, event: WindowEvent, tags: Mapping[str, str], run_id: str | None) -> str:
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"schedule-{event.window.strftime(ID_TIME_FORMAT)}",
                tags={**tags, "bitray.schedule.window": event.window.isoformat()},
            )
            run_id = run.info.run_id
        self.client.set_tag(run_id, "bitray.schedule.outcome", event.outcome)
        self.client.set_tag(run_id, "bitray.schedule.reason", event.reason)
        if event.submission_id:
            self.client.set_tag(run_id, "bitray.submission_id", event.submission_id)
        for key, value in event.counts.items():
            self.client.log_metric(run_id, key, float(value))
        status = {"failed": "FAILED", "stopped": "KILLED"}.get(event.outcome, "FINISHED")
        if event.outcome != "submitted":
            self.client.set_terminated(run_id, status=status)
        return run_id


class Scheduler:
    """Submits the embedding job of ``config_path`` once per window of ``cron``; see the module doc."""

    def __init__(
        self,
        cron: str,
        config_path: str | os.PathLike[str],
        jobs: Jobs,
        *,
        catch_up: CatchUp = "skip",
        state_uri: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        grace: timedelta = timedelta(seconds=60),
        env: Mapping[str, str] | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        if catch_up not in CATCH_UP_POLICIES:
            raise BitrayError(f"--catch-up {catch_up!r}: choose one of {', '.join(CATCH_UP_POLICIES)}")
        self.cron = parse_cron(cron)
        self.config_path = Path(config_path)
        self.config = load_config(EmbedConfig, self.config_path)  # fail early on a bad config
        self.digest = config_digest(self.config_path)
        self.jobs = jobs
        self.catch_up = catch_up
        self.state_uri = state_uri or default_state_uri(self.digest)
        self.clock = clock
        self.grace = grace
        self.env = dict(env or {})
        self.windows = WindowLog(tracking_uri)
        self.state = ScheduleState.load(self.state_uri)
        self.backfills = (
            Backfills(self.config, self.config_path, self.digest, jobs, env=self.env)
            if follows_model(self.config)
            else None
        )

    def submission_id(self, window: datetime) -> str:
        return f"bitray-embed-{self.digest}-{window.astimezone(UTC).strftime(ID_TIME_FORMAT)}"

    def tick(self) -> list[WindowEvent]:
        """Handle everything due at ``clock()``; returns what happened, in order."""
        now = self.clock().astimezone(UTC)
        events: list[WindowEvent] = []
        running = self._collect_active(events)
        if self.backfills is not None:
            try:
                self.backfills.tick()  # a moved model: backfill, catch up, gate, switch (bitray.backfill)
            except BitrayError as exc:  # never at the windows' cost: they keep the current version fresh
                log.error("backfill: %s", exc)
        if self.state.last_window is None:
            # A first start owes nothing from before it; a window that started within `grace` still runs.
            self.state.last_window = (now - self.grace - timedelta(microseconds=1)).isoformat()
        due = windows_between(self.cron, datetime.fromisoformat(self.state.last_window), now)
        if len(due) > MAX_WINDOWS_PER_TICK:
            dropped, due = due[:-MAX_WINDOWS_PER_TICK], due[-MAX_WINDOWS_PER_TICK:]
            self._record(
                WindowEvent(
                    dropped[0],
                    "skipped",
                    f"missed with {len(dropped) - 1} more windows up to "
                    f"{dropped[-1].isoformat()} (too many to catch up)",
                ),
                events,
            )
        plan = plan_windows(
            due,
            [datetime.fromisoformat(w) for w in self.state.pending],
            now,
            policy=self.catch_up,
            grace=self.grace,
            job_running=running,
        )
        for window, reason in plan.skipped:
            self._record(WindowEvent(window, "skipped", reason), events)
        if due:
            self.state.last_window = due[-1].isoformat()
        self.state.pending = [w.isoformat() for w in plan.pending]
        if plan.run is not None:
            # Submitted before the state is saved: a crash in between loses no window, and the restarted
            # scheduler's second try at it is refused by Ray (same id), so none runs twice either.
            self._submit(plan.run, events)
        self.state.save(self.state_uri)
        return events

    def run_forever(
        self,
        *,
        poll_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Tick at every window start, and every ``poll_s`` in between to collect finished jobs."""
        log.info(
            "scheduling %s every %r (UTC), catch-up %s, state %s",
            self.config_path,
            self.cron,
            self.catch_up,
            self.state_uri,
        )
        while not should_stop():
            try:
                self.tick()
            except BitrayError as exc:  # e.g. the head is unreachable for a while: log, keep going
                log.error("%s", exc)
            now = self.clock().astimezone(UTC)
            next_window = croniter(self.cron, now).get_next(datetime)
            sleep(max(0.5, min(poll_s, (next_window - now).total_seconds())))

    # -- internals ----------------------------------------------------------------------------------------

    def _collect_active(self, events: list[WindowEvent]) -> str | None:
        """The id of the job still running, or None after recording how the last one ended."""
        job_id = self.state.active_id
        if job_id is None:
            return None
        try:
            info = self.jobs.status(job_id)
        except JobNotFound:
            info = JobInfo(job_id, "FAILED", message="the cluster no longer knows this job")
        if not info.is_terminal:
            return job_id
        window = datetime.fromisoformat(self.state.active_window or self.state.last_window or "")
        counts, reason = self._counts(job_id) if info.status == "SUCCEEDED" else ({}, info.reason)
        event = WindowEvent(window, info.status.lower(), reason, job_id, counts)
        self._record(event, events, run_id=self.state.active_mlflow_run)
        self.state.active_id = self.state.active_window = self.state.active_mlflow_run = None
        self.state.save(self.state_uri)
        return None

    def _counts(self, run_id: str) -> tuple[dict[str, float], str]:
        """The run's counts from the summary it wrote under the output (its run id is the submission id)."""
        layout = output_layout(following(self.config))  # a collection: the current version's
        try:
            summary = layout.read_summary(run_id)
        except BitrayError as exc:
            return {}, f"no run summary: {exc}"
        if summary is None:
            return {}, f"no run summary: run {run_id} did not finish"
        counts = {
            k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        return counts, ""

    def _submit(self, window: datetime, events: list[WindowEvent]) -> None:
        job_id = self.submission_id(window)
        try:
            self.jobs.submit(
                "embed",
                self.config_path,
                submission_id=job_id,
                env=self.env,
                overrides={"incremental": True, "run_id": job_id, **self._window_model()},
                metadata={"bitray.schedule.window": window.isoformat(), "bitray.schedule.cron": self.cron},
            )
        except SubmissionIdTaken:
            # An earlier scheduler (that lost or never saved its state) submitted it: never run it twice,
            # but watch that job so the next window is not started while it runs.
            reason = f"already submitted as {job_id} by an earlier scheduler run; not run again"
            self._record(WindowEvent(window, "skipped", reason, job_id), events)
            self.state.active_id, self.state.active_window = job_id, window.isoformat()
            return
        except BitrayError as exc:
            self._record(WindowEvent(window, "skipped", f"submission failed: {exc}", job_id), events)
            return
        self.state.active_id, self.state.active_window = job_id, window.isoformat()
        self.state.active_mlflow_run = self._record(WindowEvent(window, "submitted", "", job_id), events)

    def _window_model(self) -> dict[str, str]:
        """A model that moved is backfilled into a new version; until the switch, windows keep embedding
        into the current version with its own model."""
        model = self.backfills.window_model() if self.backfills is not None else None
        return {"model": model} if model else {}

    def _record(self, event: WindowEvent, events: list[WindowEvent], run_id: str | None = None) -> str | None:
        events.append(event)
        tags = {
            "bitray.schedule.cron": self.cron,
            "bitray.config_digest": self.digest,
            "bitray.config": self.config_path.name,
        }
        return self.windows.record(event, tags, run_id)


def default_state_uri(digest: str) -> str:
    return str(storage.default_cache_dir() / "schedule" / f"{digest}.json")
