"""One loop from fine-tuning to search (issue 19), end to end, on local storage and on a real S3 server.

A real fine-tune (``random:tiny`` on digits from ``bitray.examples``, as a Ray job) registers a new version of
model ``tiny`` in a real MLflow sqlite registry and, by default ``promote: if_better``, moves ``champion`` to
it. Two schedules following ``models:/tiny@champion`` (one output on local disk, one on the moto S3 server)
tick side by side with an injected clock against a real local Ray head, so their jobs overlap: each notices
the moved alias, backfills as its own Ray job, catches up, gates on the labelled digits, indexes and switches,
and ``bitray outputs ROOT`` shows the switch at once. The S3 scheduler is SIGKILLed in a subprocess between a
backfill's submission and its record; a fresh one continues without a second job. A second promotion, of the
untrained model, fails the gate on the local output and leaves the fine-tuned version current.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from cluster_fixtures import tiny_embed_config
from test_embed_settings import registry  # noqa: F401 - the fixture

from bitray import outputs, storage, testhooks
from bitray.cli import main
from bitray.collection import Collection
from bitray.config import StorageConfig
from bitray.examples import iter_digits
from bitray.jobs import Jobs
from bitray.schedule import Scheduler

pytest_plugins = ["cluster_fixtures"]
pytestmark = pytest.mark.slow

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
EVERY_5_MIN = "*/5 * * * *"
PER_CLASS = 10
TIMEOUT_S = 600

# One scheduler tick in a process of its own, at a given clock: the one the test SIGKILLs.
TICK = """
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from datetime import datetime
from bitray.jobs import Jobs
from bitray.schedule import Scheduler
cron, config, address, state, now, env, tracking = sys.argv[1:]
clock = datetime.fromisoformat(now)
Scheduler(cron, config, Jobs(address), state_uri=state, clock=lambda: clock, env=json.loads(env),
          tracking_uri=tracking).tick()
"""


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def digits(per_class: int, skip: int = 0) -> list[tuple[str, bytes]]:
    """``(<digit>/<n>.png, PNG)`` for ``per_class`` digits of each class, after the first ``skip`` of each."""
    seen: dict[int, int] = {}
    chosen = []
    for n, digit, png in iter_digits():
        seen[digit] = seen.get(digit, 0) + 1
        if skip < seen[digit] <= skip + per_class:
            chosen.append((f"{digit}/{n:04d}.png", png))
    return chosen


def put(root: str, files: list[tuple[str, bytes]], config: StorageConfig | None = None) -> None:
    for name, png in files:
        storage.write_bytes(storage.join(root, name), png, config)


def wait_all(jobs: Jobs, *ids: str) -> None:
    for job in ids:
        info = jobs.wait(job, timeout_s=TIMEOUT_S)
        assert info.status == "SUCCEEDED", (job, info.reason, jobs.logs(job)[-3000:])


def listing(root: str, capsys) -> str:
    """What ``bitray outputs ROOT`` prints."""
    capsys.readouterr()
    assert main(["outputs", root]) == 0
    return capsys.readouterr().out


def test_a_finetune_moves_the_champion_and_both_outputs_follow_it(
    ray_head,
    registry,  # noqa: F811 - model tiny: versions 1 and 2 of the same untrained weights, champion on 1
    s3_server,
    s3_bucket,
    tmp_path,
    capsys,
):
    from mlflow import MlflowClient

    from bitray.model import registry as model_registry

    tracking = registry["uri"]
    jobs = Jobs(ray_head)
    clock_now = {"t": at(0)}
    s3_storage = StorageConfig(s3_endpoint=s3_server)
    local_images, s3_images = str(tmp_path / "digits"), f"s3://{s3_bucket}/digits"
    sample = digits(PER_CLASS)
    put(local_images, sample)
    put(s3_images, sample, s3_storage)
    roots = {"local": str(tmp_path / "emb"), "s3": f"s3://{s3_bucket}/emb"}
    env = {
        "MLFLOW_TRACKING_URI": tracking,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    configs, states = {}, {}
    for where, images in (("local", local_images), ("s3", s3_images)):
        extra = {"storage": {"s3_endpoint": s3_server}} if where == "s3" else {}
        # half a CPU per actor: two jobs' actors and a decode task fit the head's 2 CPUs side by side
        # and both schedules' backfills at once (the limit counts backfill jobs on the whole cluster)
        mapping = tiny_embed_config(images, roots[where], model="models:/tiny@champion", cpus_per_actor=0.5,
                                    max_concurrent_backfills=2, gate={"labels": images, "tolerance": 0.01},
                                    **extra)  # fmt: skip
        configs[where] = tmp_path / f"{where}.yaml"
        configs[where].write_text(yaml.safe_dump(mapping))
        states[where] = str(tmp_path / f"{where}-state.json")

    def scheduler(where: str) -> Scheduler:
        return Scheduler(EVERY_5_MIN, configs[where], jobs, state_uri=states[where],
                         clock=lambda: clock_now["t"], env=env, tracking_uri=tracking)  # fmt: skip

    def tick(minutes: float, *wheres: str) -> None:
        clock_now["t"] = at(minutes)
        for where in wheres:
            schedulers[where].tick()

    def job_of(where: str, version: str) -> str | None:
        return Collection(roots[where], s3_storage).record(version).job

    # 10:00: a window of each schedule makes its output with the champion of now, version 1; meanwhile a
    # fine-tune on the digits registers version 3 and, on merit, moves the champion to it (at its very end,
    # long after the windows' jobs resolved the alias: the model check below would catch the contrary)
    schedulers = {where: scheduler(where) for where in roots}
    windows = [schedulers[where].tick()[0].submission_id for where in roots]
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text(yaml.safe_dump({
        "data": local_images, "output": str(tmp_path / "model"), "model": "random:tiny", "workers": 1,
        "steps": 40, "batch_size": 32, "base_lr": 0.03, "resize": 32, "crop": 28, "checkpoint_every": 40,
        "eval_every": 40, "max_failures": 0, "storage_path": str(tmp_path / "runs"), "tracking_uri": tracking,
        "name": "loop", "registered_model": "tiny",
    }))  # fmt: skip
    wait_all(jobs, *windows, jobs.submit("finetune", finetune, env=env))
    for root in roots.values():
        assert outputs.settings(root, s3_storage).model == "models:/tiny/1"
    assert model_registry.alias_holder(tracking, "tiny", "champion")[0] == "3"
    client = MlflowClient(tracking_uri=tracking)  # the fine-tune job's run, logged and finished
    assert client.get_run(client.get_model_version("tiny", "3").run_id).info.status == "FINISHED"

    # 10:01: the local schedule notices and starts the backfill of version tiny-3; the S3 scheduler is
    # SIGKILLed after submitting its backfill job, before the version's record names it
    tick(1, "local")
    killed = subprocess.run(
        [sys.executable, "-c", TICK, EVERY_5_MIN, str(configs["s3"]), ray_head, states["s3"],
         at(1).isoformat(), json.dumps(env), tracking],
        env={**os.environ, testhooks.SCHEDULER_KILL_AT: "backfill-submitted"},
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    s3_digest = schedulers["s3"].digest
    first = f"bitray-backfill-{s3_digest}-tiny-3-1"
    assert job_of("s3", "tiny-3") is None and jobs.status(first).submission_id == first
    schedulers["s3"] = scheduler("s3")  # a fresh scheduler: watches that job, starts no other
    [found] = schedulers["s3"].backfills.tick()
    assert (found.version, found.outcome, found.job) == ("tiny-3", "found", first)
    assert job_of("s3", "tiny-3") == first
    backfills = {where: job_of(where, "tiny-3") for where in roots}
    assert backfills["local"] == f"bitray-backfill-{schedulers['local'].digest}-tiny-3-1"
    late = digits(1, skip=PER_CLASS)[:2]  # two images arrive during the backfill
    put(local_images, late)
    put(s3_images, late, s3_storage)
    # 10:05: meanwhile a window keeps the current local version up to date, with the current model
    clock_now["t"] = at(5)
    window = next(e.submission_id for e in schedulers["local"].tick() if e.outcome == "submitted")
    wait_all(jobs, *backfills.values(), window)
    ours = [
        j.submission_id for j in jobs.list() if j.submission_id.startswith(f"bitray-backfill-{s3_digest}")
    ]
    assert ours == [first]  # the version's job was never started twice
    for root in roots.values():
        assert outputs.data_path(root, s3_storage) == root  # not switched yet: readers see version 1
    assert outputs.counts(roots["local"])[0] == len(sample) + len(late)  # the late images are searchable
    assert outputs.settings(roots["local"]).model == "models:/tiny/1"

    # 10:06: one more incremental job catches up with the late images; 10:07: index, gate, switch
    tick(6, *roots)
    catch_ups = [job_of(where, "tiny-3") for where in roots]
    assert all(job.endswith("-tiny-3-2") for job in catch_ups)
    wait_all(jobs, *catch_ups)
    tick(7, *roots)
    for root in roots.values():
        version = Collection(root, s3_storage).current()
        assert version.name == "tiny-3" and version.record.gate.passed, version.record
        assert outputs.data_path(root, s3_storage) == storage.join(root, "versions", "tiny-3")
        assert outputs.settings(root, s3_storage).model == "models:/tiny/3"
        assert outputs.counts(root, s3_storage)[0] == len(sample) + len(late)  # every image, the late ones
        shown = listing(root, capsys)  # a reader sees the switch at once
        assert f"current: {storage.join(root, 'versions', 'tiny-3')}" in shown and "gate passed" in shown
        # the new version's index was built before the pointer moved to it
        index = storage.join(root, "versions", "tiny-3", "_index", "index.json")
        pointer = storage.join(root, "_bitray", "current")
        assert modified(index, s3_storage) <= modified(pointer, s3_storage)

    # a second promotion, of the untrained model (version 2): backfilled, caught up, then the gate fails
    # (on the local output only: the gate reads storage through the same code on both)
    model_registry.set_alias(tracking, "tiny", "champion", "2")
    tick(8, "local")
    wait_all(jobs, job_of("local", "tiny-2"))
    tick(8.5, "local")
    wait_all(jobs, job_of("local", "tiny-2"))
    tick(9, "local")
    collection = Collection(roots["local"])
    assert collection.current().name == "tiny-3"  # the old version stays current
    failed = collection.record("tiny-2").gate
    assert failed is not None and not failed.passed and "tiny-3's" in failed.reason
    assert outputs.data_path(roots["local"]) == storage.join(roots["local"], "versions", "tiny-3")
    assert "gate FAILED" in listing(roots["local"], capsys)
    gates = client.search_runs([client.get_experiment_by_name("bitray-embed").experiment_id],
                               filter_string="tags.`bitray.gate` = 'fail'")  # fmt: skip
    assert len(gates) == 1


def modified(uri: str, config: StorageConfig) -> float:
    """The object's or file's modification time (seconds)."""
    fs, path = storage.filesystem_for(uri, config)
    return fs.get_file_info(path).mtime.timestamp()
