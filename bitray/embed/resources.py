"""What the pipeline asks of the cluster: actor sizes, and whether local paths are visible where tasks run."""

from __future__ import annotations

import os
from dataclasses import dataclass

from bitray import ray_session, storage
from bitray.config import EmbedConfig
from bitray.embed.cluster import ClusterDescription
from bitray.embed.params import RunParams
from bitray.errors import BitrayError
from bitray.precision import Precision


@dataclass(frozen=True)
class ActorResources:
    gpus: float
    """GPUs reserved per actor."""
    cpus: float
    """CPUs reserved per actor."""
    threads: int
    """TensorFlow's intra/inter-op threads per actor."""
    actors_min: int
    actors_max: int
    cluster_cpus: float
    precision: Precision = "float32"
    """What the actors compute in: float16 (mixed) on GPU, the run's ``cpu_precision`` on CPU."""


def actor_resources(params: RunParams, cluster: ClusterDescription) -> ActorResources:
    """From the run's settings, else from the cluster: its resources now and the nodes it may add.

    Actors ask for a GPU when the cluster has one or its autoscaler can add a node that has one (GPU
    workers that start at zero), and the pool may grow to what those nodes hold at their maximum
    (``max_workers`` x actors per node, summed over node types), or to the GPUs there are now if more.

    On CPU-only clusters the default actor reserves half the cores it computes on: the other half stays
    schedulable for the decode tasks, which are light next to a BiT forward pass and share those cores,
    instead of leaving them idle (on 2 cores: one actor, 1 CPU reserved, 2 TF threads). An explicit
    ``cpus_per_actor`` is used as it is for both.
    """
    cluster_gpus = cluster.resources.get("GPU", 0)
    cluster_cpus = cluster.resources.get("CPU", 1)
    has_gpus = wants_gpus(cluster)
    gpus = (1.0 if has_gpus else 0.0) if params.gpus_per_actor is None else float(params.gpus_per_actor)
    if gpus and not has_gpus and cluster.node_types:
        raise BitrayError(
            f"gpus_per_actor is {gpus:g}, but the cluster has no GPU and none of its autoscaler's node types "
            f"({', '.join(t.name for t in cluster.node_types)}, from {cluster.source}) has one: the actors "
            "would wait for ever. Remove gpus_per_actor (or set it to 0) on a CPU-only cluster"
        )
    if params.cpus_per_actor is not None:
        cpus = float(params.cpus_per_actor)
        threads = max(1, int(cpus))
    else:
        cpus = 1.0 if gpus else float(min(4, max(1, int(cluster_cpus // 4))))
        threads = max(1, int(cpus)) if gpus else 2 * max(1, int(cpus))
    if params.actors_max is not None:
        actors_max = params.actors_max
    elif gpus:
        actors_max = max(int(cluster_gpus // gpus), cluster.actors_addable("GPU", gpus))
    else:
        actors_max = int(cluster_cpus // (2 * cpus))
    actors_max = max(1, actors_max)
    gpu_precision: Precision = "float16" if params.mixed_precision else "float32"
    precision = gpu_precision if gpus else params.cpu_precision
    return ActorResources(
        gpus, cpus, threads, min(params.actors_min, actors_max), actors_max, cluster_cpus, precision
    )


def wants_gpus(cluster: ClusterDescription) -> bool:
    """Whether model actors (and served model replicas) ask for a GPU: the cluster has one now, or its
    autoscaler can add a node that has one."""
    return bool(cluster.resources.get("GPU", 0)) or cluster.can_add("GPU")


def joins_existing_cluster(address: str | None) -> bool:
    """Whether the pipeline runs on a cluster it did not start itself (so possibly on other machines)."""
    target = address if address is not None else os.environ.get("RAY_ADDRESS")
    return bool(target) and target != "local"


def local_paths(config: EmbedConfig, output: str) -> list[str]:
    uris = [*config.inputs, *([config.manifest] if config.manifest else []), output]
    return [uri for uri in uris if not storage.is_remote(uri)]


def check_local_paths(config: EmbedConfig, output: str, address: str | None) -> None:
    """Refuse local paths that Ray workers on other nodes could not see; see ``EmbedConfig.shared_storage``.

    Called before anything is listed or written; joins the cluster only when there is a local path. With
    ``shared_storage`` the claim is checked: a task on every node must see the inputs and a probe file.
    """
    paths = local_paths(config, output)
    if not paths:
        return
    target = address if address is not None else os.environ.get("RAY_ADDRESS", "")
    client = str(target).startswith("ray://")
    if not client:
        ray_session.connect(address)
    nodes = [] if client else _alive_nodes()
    if not client and len(nodes) <= 1:
        return
    where = "through a ray:// client" if client else f"on a cluster of {len(nodes)} nodes"
    if not config.shared_storage:
        raise BitrayError(
            f"local path {paths[0]!r} cannot be used {where}: Ray workers on other machines do not see it. "
            "Use s3:// or gs:// URIs, or set shared_storage: true (--shared-storage) if every node mounts "
            "it at the same path (e.g. NFS)"
        )
    _probe_shared(paths, nodes or _alive_nodes(), where)


def _alive_nodes() -> list[dict]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def _probe_shared(paths: list[str], nodes: list[dict], where: str) -> None:
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    output = storage.local_path(paths[-1])
    probe = output / "_bitray" / f".probe-{uuid.uuid4().hex}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("bitray")
    try:

        @ray.remote(num_cpus=0)
        def missing(candidates: list[str]) -> list[str]:
            return [p for p in candidates if not os.path.exists(p)]

        candidates = [str(storage.local_path(p)) for p in paths[:-1]] + [str(probe)]
        refs = [
            missing.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(candidates)
            for n in nodes
        ]
        for node, absent in zip(nodes, ray.get(refs), strict=True):
            if absent:
                raise BitrayError(
                    f"shared_storage is set, but node {node.get('NodeManagerAddress')} does not see "
                    f"{absent[0]!r}; mount the same storage at the same path on every node ({where})"
                )
    finally:
        probe.unlink(missing_ok=True)
