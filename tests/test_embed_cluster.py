"""Actor sizes from a cluster description: GPU node types at zero workers get GPU actors, CPU stays as is."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from bitray.config import EmbedConfig, read_yaml
from bitray.embed.cluster import (
    UNLIMITED_WORKERS,
    ClusterDescription,
    NodeType,
    describe_cluster,
    node_types_from_autoscaling_config,
    node_types_from_gcs_config,
    node_types_from_ray_cluster_spec,
)
from bitray.embed.params import InputCounts, RunParams
from bitray.embed.resources import actor_resources
from bitray.errors import BitrayError

ROOT = Path(__file__).resolve().parent.parent
HEAD_ONLY = {"CPU": 8.0, "memory": 3e10}  # a CPU head; GPU workers not started yet


def params(**settings) -> RunParams:
    config = EmbedConfig(inputs=["s3://b/photos/"], **settings)
    return RunParams.for_run(config, "run", InputCounts(), [])


def gpu_workers(max_workers: int, gpus: float = 1, cpus: float = 4, name: str = "gpu") -> NodeType:
    return NodeType(name, {"CPU": cpus, "GPU": gpus}, min_workers=0, max_workers=max_workers)


def test_gpu_node_types_at_zero_workers_get_gpu_actors_up_to_their_maximum():
    cluster = ClusterDescription(HEAD_ONLY, (gpu_workers(4),), "test")
    got = actor_resources(params(), cluster)
    assert (got.gpus, got.cpus, got.threads) == (1.0, 1.0, 1)
    assert (got.actors_min, got.actors_max) == (1, 4)
    assert got.precision == "float16"
    assert actor_resources(params(mixed_precision=False), cluster).precision == "float32"


def test_pool_size_sums_actors_per_node_over_gpu_node_types():
    four_gpus = gpu_workers(2, gpus=4, cpus=48, name="p4")  # 2 nodes x 2 actors of 2 GPUs
    one_gpu = gpu_workers(3, gpus=1, name="g5")  # 1 GPU holds no 2-GPU actor
    cpu = NodeType("cpu", {"CPU": 16.0}, max_workers=10)
    cluster = ClusterDescription(HEAD_ONLY, (four_gpus, one_gpu, cpu), "test")
    assert actor_resources(params(gpus_per_actor=2), cluster).actors_max == 4
    assert actor_resources(params(), cluster).actors_max == 2 * 4 + 3
    assert actor_resources(params(actors_max=3), cluster).actors_max == 3  # an explicit size wins


def test_gpus_there_now_count_when_they_exceed_the_node_types():
    cluster = ClusterDescription({**HEAD_ONLY, "GPU": 8.0}, (gpu_workers(2),), "test")
    assert actor_resources(params(), cluster).actors_max == 8


@pytest.mark.parametrize("node_types", [(), (NodeType("cpu", {"CPU": 16.0}, max_workers=10),)])
def test_cpu_only_clusters_behave_as_before(node_types):
    cluster = ClusterDescription({"CPU": 2.0}, node_types, "test")
    got = actor_resources(params(), cluster)
    assert (got.gpus, got.cpus, got.threads, got.actors_max) == (0.0, 1.0, 2, 1)
    assert got.precision == "float32"
    big = actor_resources(
        params(cpu_precision="bfloat16", model="random:r50x1"), ClusterDescription({"CPU": 32.0})
    )
    assert (big.gpus, big.cpus, big.threads, big.actors_max) == (0.0, 4.0, 8, 4)
    assert big.precision == "bfloat16"


def test_asking_for_gpus_the_autoscaler_cannot_add_is_refused():
    cluster = ClusterDescription(HEAD_ONLY, (NodeType("cpu", {"CPU": 16.0}, max_workers=10),), "test")
    with pytest.raises(BitrayError, match=r"gpus_per_actor is 1.*cpu, from test.*Remove gpus_per_actor"):
        actor_resources(params(gpus_per_actor=1), cluster)
    # without node types the cluster may still get GPUs some other way: today's behaviour
    assert actor_resources(params(gpus_per_actor=1), ClusterDescription(HEAD_ONLY)).gpus == 1.0


def test_cluster_yaml_and_the_example_config_give_gpu_actors():
    prepared = prepare_config(copy.deepcopy(yaml.safe_load((ROOT / "cluster.yaml").read_text())))
    validate_config(prepared)
    cluster = ClusterDescription(HEAD_ONLY, node_types_from_autoscaling_config(prepared), "cluster.yaml")
    assert [t.name for t in cluster.node_types] == ["ray.worker.gpu"]  # not the head
    config = EmbedConfig.model_validate(read_yaml(ROOT / "pipelines" / "configs" / "embed.yaml"))
    got = actor_resources(RunParams.for_run(config, "run", InputCounts(), []), cluster)
    assert (got.gpus, got.actors_max, got.precision) == (1.0, prepared["max_workers"], "float16")


def test_raycronjob_cluster_and_the_deploy_config_give_gpu_actors():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "raycronjob.yaml").read_text()) if d}
    spec = docs["RayCronJob"]["spec"]["jobTemplate"]["rayClusterSpec"]
    types = node_types_from_ray_cluster_spec(spec)
    assert [(t.name, t.resources["GPU"], t.min_workers, t.max_workers) for t in types] == [("gpu", 1, 0, 4)]
    common = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "common.yaml").read_text()) if d}
    settings = yaml.safe_load(common["ConfigMap"]["data"]["embed.yaml"])
    run = RunParams.for_run(EmbedConfig.model_validate(settings), "run", InputCounts(), [])
    got = actor_resources(run, ClusterDescription(HEAD_ONLY, types, "raycronjob.yaml"))
    assert (got.gpus, got.actors_max) == (1.0, 4)
    # what the config writes out is what the node types give when it does not (they cannot drift apart)
    defaults = {k: v for k, v in settings.items() if k not in ("gpus_per_actor", "actors_max")}
    run = RunParams.for_run(EmbedConfig.model_validate(defaults), "run", InputCounts(), [])
    derived = actor_resources(run, ClusterDescription(HEAD_ONLY, types, "raycronjob.yaml"))
    assert (derived.gpus, derived.actors_max) == (got.gpus, got.actors_max)


def test_gcs_cluster_config_node_types():
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="a100", min_count=0, max_count=-1)
    group.resources.update({"CPU": 12, "GPU": 1})
    assert node_types_from_gcs_config(config) == (
        NodeType("a100", {"CPU": 12, "GPU": 1}, 0, UNLIMITED_WORKERS),
    )


def test_live_description_of_a_local_ray_and_of_a_reported_cluster_config(ray_local):
    import ray
    from ray.core.generated import autoscaler_pb2

    local = describe_cluster()
    assert local.resources["CPU"] == ray.cluster_resources()["CPU"]
    assert local.node_types == () and local.source == "ray.cluster_resources()"
    assert actor_resources(params(), local).gpus == 0.0  # today's decision

    # What an autoscaler that reports its config to the GCS writes (Ray's own tests do the same)
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu", min_count=0, max_count=3)
    group.resources.update({"CPU": 4, "GPU": 1})
    gcs = ray._private.worker.global_worker.gcs_client
    gcs.report_cluster_config(config.SerializeToString())
    try:
        reported = describe_cluster()
    finally:
        gcs.report_cluster_config(autoscaler_pb2.ClusterConfig().SerializeToString())  # other tests
    assert reported.source == "the GCS cluster config"
    assert reported.node_types == (NodeType("gpu", {"CPU": 4, "GPU": 1}, 0, 3),)
    assert (actor_resources(params(), reported).gpus, actor_resources(params(), reported).actors_max) == (
        1.0,
        3,
    )
    assert describe_cluster().node_types == ()
