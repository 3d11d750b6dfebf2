"""``bitray schedule``: the window plan as a pure function, then the scheduler against a real local Ray head
with real incremental embedding jobs, an injected clock (no real waiting for cron) and MLflow sqlite."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from cluster_fixtures import tiny_embed_config
from PIL import Image

from bitray.errors import BitrayError
from bitray.jobs import JobNotFound, Jobs
from bitray.schedule import Scheduler, plan_windows, windows_between

pytest_plugins = ["cluster_fixtures"]

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
GRACE = timedelta(seconds=60)
EVERY_5_MIN = "*/5 * * * *"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


# -- the plan: pure --------------------------------------------------------------------------------------


def test_windows_between_is_exclusive_of_start_inclusive_of_end():
    assert windows_between(EVERY_5_MIN, at(0), at(15)) == [at(5), at(10), at(15)]
    assert windows_between(EVERY_5_MIN, at(0), at(4.9)) == []


def test_current_window_runs_unless_a_job_is_running():
    plan = plan_windows([at(5)], [], at(5), policy="skip", grace=GRACE, job_running=None)
    assert (plan.run, plan.skipped, plan.pending) == (at(5), [], [])
    plan = plan_windows([at(5)], [], at(5), policy="skip", grace=GRACE, job_running="job-1")
    assert plan.run is None
    assert plan.skipped == [(at(5), "the previous job job-1 is still running")]


@pytest.mark.parametrize(
    ("policy", "run", "skipped", "pending"),
    [
        ("skip", None, [at(5), at(10), at(15)], []),
        ("latest", at(15), [at(5), at(10)], []),
        ("all", at(5), [], [at(10), at(15)]),
    ],
)
def test_catch_up_policies_for_missed_windows(policy, run, skipped, pending):
    # the scheduler was down from 10:00 to 10:17: three windows missed, none current
    plan = plan_windows([at(5), at(10), at(15)], [], at(17), policy=policy, grace=GRACE, job_running=None)
    assert plan.run == run
    assert [w for w, _ in plan.skipped] == skipped
    assert all("missed" in reason for _, reason in plan.skipped)
    assert plan.pending == pending


def test_catch_up_all_runs_queued_windows_first_and_queues_the_current_one():
    plan = plan_windows([at(20)], [at(10), at(15)], at(20), policy="all", grace=GRACE, job_running=None)
    assert (plan.run, plan.skipped, plan.pending) == (at(10), [], [at(15), at(20)])
    # while a job runs, the queue waits and the current window is skipped like under any policy
    plan = plan_windows([at(25)], [at(15), at(20)], at(25), policy="all", grace=GRACE, job_running="j")
    assert (plan.run, plan.pending) == (None, [at(15), at(20)])
    assert [w for w, _ in plan.skipped] == [at(25)]


def test_latest_prefers_the_current_window_over_missed_ones():
    plan = plan_windows([at(5), at(10)], [], at(10), policy="latest", grace=GRACE, job_running=None)
    assert plan.run == at(10)
    assert [w for w, _ in plan.skipped] == [at(5)]


# -- against the local head -----------------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def write_png(path: Path, seed: int, size: int = 40) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def test_bad_cron_or_policy_is_a_clear_error(tmp_path, mlflow_tracking_uri):
    config = tmp_path / "embed.yaml"
    config.write_text(yaml.safe_dump({"inputs": [str(tmp_path)], "output": str(tmp_path / "out")}))
    with pytest.raises(BitrayError, match="not a valid cron expression"):
        Scheduler("every 5 minutes", config, jobs=None)  # type: ignore[arg-type]
    with pytest.raises(BitrayError, match="--catch-up 'sometimes'"):
        Scheduler(EVERY_5_MIN, config, jobs=None, catch_up="sometimes")  # type: ignore[arg-type]


def test_cli_rejects_a_bad_cron_before_connecting(tmp_path, capsys):
    from bitray.cli import main

    config = tmp_path / "embed.yaml"
    config.write_text(yaml.safe_dump({"inputs": [str(tmp_path)]}))
    argv = ["schedule", "--cron", "61 * * * *", "--config", str(config), "--address", "http://127.0.0.1:9"]
    assert main(argv) == 2
    assert "--cron '61 * * * *' is not a valid cron expression" in capsys.readouterr().err


@pytest.mark.slow
def test_run_forever_sleeps_until_the_next_window_or_the_poll(ray_head, mlflow_tracking_uri, tmp_path):
    config = tmp_path / "embed.yaml"
    config.write_text(yaml.safe_dump({"inputs": [str(tmp_path)], "output": str(tmp_path / "out")}))
    clock = Clock(at(4) + timedelta(seconds=45))  # 15 s before the 10:05 window
    sleeps: list[float] = []
    scheduler = Scheduler(
        EVERY_5_MIN,
        config,
        Jobs(ray_head),
        state_uri=str(tmp_path / "state.json"),
        clock=clock,
        tracking_uri=mlflow_tracking_uri,
    )

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now = at(4) + timedelta(seconds=50)  # stays before the window: nothing is submitted

    scheduler.run_forever(poll_s=30, sleep=sleep, should_stop=lambda: len(sleeps) >= 2)
    assert sleeps == [15.0, 10.0]
    ours = f"bitray-embed-{scheduler.digest}-"
    assert not [j for j in Jobs(ray_head).list() if j.submission_id.startswith(ours)]


@pytest.mark.slow
def test_three_windows_embed_every_version_once_across_restarts(ray_head, mlflow_tracking_uri, tmp_path):
    from mlflow import MlflowClient

    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    write_png(images / "a.png", 1)
    write_png(images / "b.png", 2)
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump(tiny_embed_config(str(images), str(output))))
    jobs = Jobs(ray_head)
    state = str(tmp_path / "schedule-state.json")
    clock = Clock(at(0))

    def scheduler(state_uri: str = state) -> Scheduler:
        return Scheduler(
            EVERY_5_MIN, config, jobs, state_uri=state_uri, clock=clock, tracking_uri=mlflow_tracking_uri
        )

    def outcomes(events) -> list[tuple[datetime, str]]:
        return [(e.window, e.outcome) for e in events]

    # window 10:00: a and b are new
    first = scheduler()
    events = first.tick()
    assert outcomes(events) == [(at(0), "submitted")]
    job_1 = events[0].submission_id
    # window 10:05 starts while that job still runs (it was submitted a moment ago): skipped, logged
    clock.now = at(5)
    events = first.tick()
    assert outcomes(events) == [(at(5), "skipped")]
    assert job_1 in events[0].reason and "still running" in events[0].reason
    assert jobs.wait(job_1, timeout_s=300).status == "SUCCEEDED"
    clock.now = at(6)
    events = first.tick()
    assert outcomes(events) == [(at(0), "succeeded")]
    assert events[0].counts["embedded"] == 2

    # between windows: b changes, c is new, a is unchanged; the scheduler restarts (a new process)
    write_png(images / "b.png", 22, size=48)
    write_png(images / "c.png", 3)
    clock.now = at(10)
    second = scheduler()
    events = second.tick()
    assert outcomes(events) == [(at(10), "submitted")]
    job_2 = events[0].submission_id
    # a scheduler that lost its state tries the same window: Ray refuses the id, nothing runs twice
    amnesiac = scheduler(str(tmp_path / "lost-state.json"))
    events = amnesiac.tick()
    assert outcomes(events) == [(at(10), "skipped")]
    assert "already submitted" in events[0].reason
    assert jobs.wait(job_2, timeout_s=300).status == "SUCCEEDED"
    clock.now = at(11)
    events = scheduler().tick()  # restarted again: collects the result, submits nothing
    assert outcomes(events) == [(at(10), "succeeded")]
    assert events[0].counts["embedded"] == 2

    # window 10:15: nothing changed, the job embeds nothing
    clock.now = at(15)
    events = scheduler().tick()
    assert outcomes(events) == [(at(15), "submitted")]
    assert jobs.wait(events[0].submission_id, timeout_s=300).status == "SUCCEEDED"
    clock.now = at(16)
    events = scheduler().tick()
    assert outcomes(events) == [(at(15), "succeeded")]
    assert events[0].counts["embedded"] == 0

    # down from 10:16 to 10:32 with catch-up "skip": the missed windows are logged, none runs
    clock.now = at(32)
    events = scheduler().tick()
    assert outcomes(events) == [(at(m), "skipped") for m in (20, 25, 30)]
    assert all("missed" in e.reason for e in events)

    # every object version was embedded exactly once, across all windows
    table = pq.read_table(output / "embeddings")
    versions = list(zip(table.column("path").to_pylist(), table.column("size").to_pylist(), strict=True))
    assert len(versions) == len(set(versions)) == 4
    assert sorted(Path(p).name for p, _ in versions) == ["a.png", "b.png", "b.png", "c.png"]
    # this schedule's jobs only: the Ray head is shared with other tests' schedules (backfills, say)
    ours = [j for j in jobs.list() if j.submission_id.startswith(f"bitray-embed-{first.digest}-")]
    assert len(ours) == 3

    client = MlflowClient(tracking_uri=mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("bitray-embed")
    logged = {}
    for run in client.search_runs([experiment.experiment_id]):
        if "bitray.schedule.window" in run.data.tags:
            logged.setdefault(run.data.tags["bitray.schedule.window"], []).append(run)
    assert len(logged) == 7  # 10:00 ... 10:30, each window logged
    window_0500 = logged[at(5).isoformat()]
    assert [r.data.tags["bitray.schedule.outcome"] for r in window_0500] == ["skipped"]
    assert "still running" in window_0500[0].data.tags["bitray.schedule.reason"]
    window_1000 = logged[at(0).isoformat()]
    assert [r.data.tags["bitray.schedule.outcome"] for r in window_1000] == ["succeeded"]
    assert window_1000[0].data.metrics["embedded"] == 2


@pytest.mark.slow
def test_a_failed_window_is_logged_with_ray_reason(ray_head, mlflow_tracking_uri, tmp_path):
    from mlflow import MlflowClient

    config = tmp_path / "embed.yaml"
    config.write_text(yaml.safe_dump({"inputs": [str(tmp_path / "gone")], "output": str(tmp_path / "out")}))
    jobs = Jobs(ray_head)
    clock = Clock(at(0))
    scheduler = Scheduler(
        EVERY_5_MIN,
        config,
        jobs,
        state_uri=str(tmp_path / "s.json"),
        clock=clock,
        tracking_uri=mlflow_tracking_uri,
    )
    (submitted,) = scheduler.tick()
    assert jobs.wait(submitted.submission_id, timeout_s=300).status == "FAILED"
    clock.now = at(1)
    (failed,) = scheduler.tick()
    assert (failed.window, failed.outcome) == (at(0), "failed")
    assert failed.reason == "Job entrypoint command failed with exit code 2"
    client = MlflowClient(tracking_uri=mlflow_tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("bitray-embed").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["bitray.schedule.outcome"] == "failed"


@pytest.mark.slow
def test_a_job_the_cluster_forgot_is_recorded_as_failed(ray_head, mlflow_tracking_uri, tmp_path):
    """A state file naming a job the head does not know (a new head since): ``Jobs.status`` raises the
    typed ``JobNotFound``, and the scheduler records the window as failed instead of stopping."""
    import json

    config = tmp_path / "embed.yaml"
    config.write_text(yaml.safe_dump({"inputs": [str(tmp_path)], "output": str(tmp_path / "out")}))
    state = tmp_path / "state.json"
    forgotten = "bitray-embed-forgotten"
    window = at(0).isoformat()
    state.write_text(json.dumps({"last_window": window, "active_id": forgotten, "active_window": window}))
    jobs = Jobs(ray_head)
    with pytest.raises(JobNotFound):
        jobs.status(forgotten)
    scheduler = Scheduler(
        EVERY_5_MIN, config, jobs, state_uri=str(state), clock=Clock(at(1)), tracking_uri=mlflow_tracking_uri
    )
    (event,) = scheduler.tick()
    assert (event.window, event.outcome, event.submission_id) == (at(0), "failed", forgotten)
    assert event.reason == "the cluster no longer knows this job"
    assert json.loads(state.read_text())["active_id"] is None
