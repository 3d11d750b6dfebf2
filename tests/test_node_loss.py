"""A worker node lost mid-run on a real multi-node Ray (``ray.cluster_utils.Cluster``: a head and two worker
nodes on this machine, in a process of its own so the session's Ray is untouched).

In the embedding the head has no CPUs and the second worker node joins only when the first is about to go,
so everything that ran until then (decode tasks, the model actor, the writers) ran on the removed node
(``Cluster.remove_node``, its processes killed). In the fine-tune one or both Train workers are there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FAST_DEATH = {  # the GCS declares a killed node dead in about 5 s instead of 30 (not faster: on a busy
    "health_check_period_ms": 1000,  # machine a live node would be declared dead too)
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 5,
}

EMBED = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path

    import bitray  # before Ray starts its nodes: they inherit the Keras 2 switch
    import ray
    from ray.cluster_utils import Cluster
    from bitray.config import EmbedConfig
    from bitray.embed import run_embedding

    src, out, system_config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": system_config})
    doomed = cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    report = {}

    config = EmbedConfig(
        inputs=[src], output=out, model="random:tiny", image_size=32, batch_size=8, rows_per_file=16,
        actors_min=1, actors_max=1, cpus_per_actor=1, shared_storage=True,
    )

    def embed():
        try:
            report["summary"] = run_embedding(config, address=cluster.address).to_dict()
        except BaseException as exc:
            report["error"] = repr(exc)
        report["finished_at"] = time.monotonic()

    try:
        runner = threading.Thread(target=embed, daemon=True)
        runner.start()  # nodes are added and removed from the main thread only (Ray's rule)
        runs = Path(out, "_bitray", "runs")
        while not any(runs.glob("*/log/*")) and runner.is_alive():  # a file written and logged
            time.sleep(0.02)
        cluster.add_node(num_cpus=3)  # the replacement an autoscaler would add; it joins first, so that
        cluster.wait_for_nodes()  # the test does not wait on a slow node start
        cluster.remove_node(doomed, allow_graceful=False)
        report["lost_at"] = time.monotonic()
        report["published_at_loss"] = len(list(Path(out, "embeddings").glob("*.parquet")))
        runner.join(timeout=180)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("REPORT " + json.dumps(report))
    """
)

FINETUNE = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path

    import bitray  # before Ray starts its nodes: they inherit the Keras 2 switch
    import ray
    from mlflow import MlflowClient
    from ray.cluster_utils import Cluster
    from bitray.config import FinetuneConfig
    from bitray.finetune import run_finetune

    data, root, tracking_uri, system_config = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": system_config})
    doomed = cluster.add_node(num_cpus=2)  # the head holds one Train worker at most: one or both are here
    cluster.wait_for_nodes()
    report = {}
    client = MlflowClient(tracking_uri=tracking_uri)

    config = FinetuneConfig(
        data=data, output=str(Path(root, "model")), workers=2, model="random:tiny", resize=32, crop=28,
        batch_size=64, base_lr=0.03, boundaries=[5, 60, 70, 80], checkpoint_every=20, eval_every=40,
        max_failures=2, name="lost", storage_path=str(Path(root, "runs")), tracking_uri=tracking_uri,
        registered_model=None,
    )

    def finetune():
        try:
            result = run_finetune(config, address=cluster.address)
            run = client.get_run(result.mlflow_run_id)
            report["steps"] = result.steps
            report["resumed_from"] = run.data.tags.get("bitray.resumed_from_step")
            report["history"] = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
            report["exported"] = Path(result.feature_vector_uri, "saved_model.pb").is_file()
        except BaseException as exc:
            report["error"] = repr(exc)

    try:
        runner = threading.Thread(target=finetune, daemon=True)
        runner.start()  # nodes are added and removed from the main thread only (Ray's rule)
        snapshot = Path(root, "runs", "lost", "checkpoint_manager_snapshot.json")
        while runner.is_alive():  # a checkpoint committed (step 20) and training beyond it
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                filter_string="tags.`bitray.run_name` = 'lost'",
            )
            history = client.get_metric_history(runs[0].info.run_id, "train/loss") if runs else []
            if snapshot.exists() and max((m.step for m in history), default=0) >= 25:
                break
            time.sleep(0.2)
        actors = ray._private.state.actors().values()  # the GCS's actor table (no dashboard here)
        report["workers_on_lost_node"] = sum(
            1
            for a in actors
            if "RayTrainWorker" in a["ActorClassName"] and a["State"] == "ALIVE"
            and a["Address"]["NodeID"] == doomed.node_id
        )
        report["step_at_loss"] = max((m.step for m in history), default=0)
        cluster.add_node(num_cpus=1)  # the replacement an autoscaler would add
        cluster.wait_for_nodes()
        cluster.remove_node(doomed, allow_graceful=False)
        runner.join(timeout=300)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("REPORT " + json.dumps(report))
    """
)


def run_script(script: str, *args: str, timeout: float = 240) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    reports = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and reports, (result.stdout[-3000:], result.stderr[-5000:])
    return json.loads(reports[-1].removeprefix("REPORT "))


def test_embedding_survives_losing_the_node_of_its_decoders_and_actors(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    n = 1200
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(src / f"{i:04d}.jpg", quality=90)
    out = tmp_path / "out"
    started = time.monotonic()
    report = run_script(EMBED, str(src), str(out), json.dumps(FAST_DEATH))
    print(f"embedding with a node lost: {time.monotonic() - started:.1f} s")

    assert "error" not in report, report["error"]
    summary = report["summary"]
    assert report["lost_at"] < report["finished_at"], report  # the node went while the run was going on
    assert (summary["inputs"], summary["embedded"], summary["errored"]) == (n, n, 0), summary
    paths = pq.read_table(out / "embeddings", columns=["path"]).column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in src.iterdir())  # every image, exactly once
    assert len(list((out / "embeddings").glob("*.parquet"))) > report["published_at_loss"]  # work after it


def test_finetune_resumes_from_its_checkpoint_after_losing_a_train_workers_node(tmp_path):
    from bitray.examples import iter_digits

    data = tmp_path / "digits"
    for n, digit, png in iter_digits():
        if n < 400:  # 40 per class on average: enough for 80 steps of the tiny model
            (data / str(digit)).mkdir(parents=True, exist_ok=True)
            (data / str(digit) / f"{n:04d}.png").write_bytes(png)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.monotonic()
    report = run_script(FINETUNE, str(data), str(tmp_path), tracking_uri, json.dumps(FAST_DEATH), timeout=400)
    print(f"fine-tune with a node lost: {time.monotonic() - started:.1f} s")

    assert "error" not in report, report["error"]
    assert report["workers_on_lost_node"] >= 1, report
    assert report["steps"] == 80 and report["exported"], report
    resumed_from = int(report["resumed_from"])
    assert 20 <= resumed_from <= report["step_at_loss"]  # a checkpoint taken before the loss, not step 0
    assert report["history"] == list(range(1, 81))  # one contiguous step axis: no gap, no step twice
