"""The schedule follows the model (``bitray.backfill``): a moved alias is backfilled into a new version as its
own Ray job while windows keep the current version up to date, then caught up, gated and switched.

Real local Ray head and job server, real MLflow sqlite registry (two versions of a tiny exported model), an
injected clock as in ``test_schedule.py``. The whole loop from a real fine-tune (backfill, catch-up, gate,
switch, a killed scheduler, a failing gate) is ``test_loop.py``; here: a killed backfill driver, the limit on
concurrent backfills and an overtaken backfill.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import yaml
from cluster_fixtures import tiny_embed_config
from test_embed_settings import registry  # noqa: F401 - the fixture
from test_schedule import Clock, write_png

from bitray.backfill import Backfills
from bitray.collection import Collection
from bitray.config import EmbedConfig, load_config
from bitray.jobs import Jobs
from bitray.schedule import Scheduler

pytest_plugins = ["cluster_fixtures"]
pytestmark = pytest.mark.slow

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
EVERY_5_MIN = "*/5 * * * *"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_a_killed_backfill_is_resubmitted_and_an_overtaken_one_abandoned(ray_head, registry, tmp_path):  # noqa: F811
    from bitray.model import registry as model_registry

    images, root = tmp_path / "images", tmp_path / "emb"
    images.mkdir()
    for n in range(2):
        write_png(images / f"{n}.png", n)
    config = tmp_path / "nightly.yaml"
    config.write_text(
        yaml.safe_dump(tiny_embed_config(str(images), str(root), model="models:/tiny@champion"))
    )
    jobs = Jobs(ray_head)
    env = {"MLFLOW_TRACKING_URI": registry["uri"]}
    state = str(tmp_path / "state.json")
    scheduler = Scheduler(EVERY_5_MIN, config, jobs, state_uri=state, clock=Clock(at(0)), env=env,
                          tracking_uri=registry["uri"])  # fmt: skip
    assert jobs.wait(scheduler.tick()[0].submission_id, timeout_s=300).status == "SUCCEEDED"

    model_registry.set_alias(registry["uri"], "tiny", "champion", "2")
    [started] = scheduler.backfills.tick()
    assert (started.version, started.outcome) == ("tiny-2", "started")
    # another schedule's model moves too: its backfill waits while this one runs (max_concurrent_backfills: 1)
    other = Collection(str(tmp_path / "other"))
    other.add("tiny-1", resolved="models:/tiny/1")
    other.update("tiny-1", state="complete")
    other.switch("tiny-1")
    config_2 = tmp_path / "other.yaml"
    config_2.write_text(
        yaml.safe_dump(tiny_embed_config(str(images), other.root, model="models:/tiny@champion"))
    )
    [waiting] = Backfills(load_config(EmbedConfig, config_2), config_2, "other", jobs, env=env).tick()
    assert (waiting.outcome, started.job in waiting.reason) == ("waiting", True)
    assert [v.name for v in other.versions()] == ["tiny-1"]

    assert jobs.stop(started.job, wait_s=60).status == "STOPPED"  # the backfill's driver is killed
    [resumed] = scheduler.backfills.tick()
    assert (resumed.outcome, resumed.job) == ("resubmitted", started.job[:-1] + "2")

    model_registry.set_alias(registry["uri"], "tiny", "champion", "1")  # the promotion is rolled back
    [abandoned] = scheduler.backfills.tick()
    assert (abandoned.version, abandoned.outcome) == ("tiny-2", "abandoned")
    assert jobs.status(resumed.job).is_terminal
    assert scheduler.backfills.tick() == []  # the current model again: nothing to backfill
    states = {v.name: v.state for v in Collection(str(root)).versions()}
    assert states == {"v0": "current", "tiny-2": "retired"}  # kept until bitray outputs gc
