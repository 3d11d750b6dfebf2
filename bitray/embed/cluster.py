"""What the Ray cluster has now and which nodes its autoscaler may add: the input of ``actor_resources``.

A cluster whose GPU workers start at zero reports no GPU in ``ray.cluster_resources()``; only the
autoscaler's node types say that GPUs can come. ``describe_cluster`` reads them, first found wins:

1. the cluster config the autoscaler reports to the GCS (``ray._private.state.state.get_cluster_config``,
   what Ray Data and Ray Train read; Ray 2.60's own autoscalers do not report it yet, others may);
2. the cluster launcher's autoscaling config on the head node (``~/ray_bootstrap_config.yaml``, written
   by ``ray up`` with the instance types' CPUs and GPUs filled in);
3. on KubeRay, the RayCluster resource, read through the Kubernetes API with the pod's service account
   and turned into node types by Ray's own KubeRay autoscaler code.

Without any (a local ``ray.init()``, a cluster without autoscaler), the description holds the current
resources only and the decision is the one made from them alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

UNLIMITED_WORKERS = 64
"""A node type without an upper bound counts as this many nodes when sizing the actor pool."""
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
K8S_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
HEAD_RESOURCE = "node:__internal_head__"


@dataclass(frozen=True)
class NodeType:
    """One kind of worker node the autoscaler may start: its Ray resources and how many of it."""

    name: str
    resources: Mapping[str, float]
    min_workers: int = 0
    max_workers: int = 0


@dataclass(frozen=True)
class ClusterDescription:
    """The cluster's resources now, and the worker node types its autoscaler may add (none: unknown)."""

    resources: Mapping[str, float]
    node_types: tuple[NodeType, ...] = ()
    source: str = "ray.cluster_resources()"
    """Where the node types came from, for logs and error messages."""
    notes: tuple[str, ...] = ()
    """Why sources before it gave no node types (a KubeRay pod without API access, say)."""

    def can_add(self, resource: str) -> bool:
        """Whether the autoscaler may start a node that has ``resource``."""
        return any(t.resources.get(resource, 0) > 0 and t.max_workers > 0 for t in self.node_types)

    def actors_addable(self, resource: str, per_actor: float) -> int:
        """Actors of ``per_actor`` units of ``resource`` that the node types hold at their maximum size."""
        return sum(t.max_workers * int(t.resources.get(resource, 0) // per_actor) for t in self.node_types)


def node_types_from_autoscaling_config(config: Mapping[str, Any]) -> tuple[NodeType, ...]:
    """The worker node types of a cluster launcher config (``available_node_types``; not the head's).

    ``resources`` must be written out: the cluster launcher fills in an instance type's CPUs and GPUs
    only when it calls the cloud, which this reader does not.
    """
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        types.append(
            NodeType(
                name=str(name),
                resources={k: float(v) for k, v in (spec.get("resources") or {}).items()},
                min_workers=int(spec.get("min_workers", 0)),
                max_workers=int(spec.get("max_workers", config.get("max_workers", 0))),
            )
        )
    return tuple(types)


def node_types_from_ray_cluster_spec(spec: Mapping[str, Any]) -> tuple[NodeType, ...]:
    """The worker groups of a KubeRay ``RayCluster`` spec, read by Ray's own KubeRay autoscaler code."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    ray_cr = {"metadata": {"name": "bitray", "namespace": "default"}, "spec": dict(spec)}
    return node_types_from_autoscaling_config(_derive_autoscaling_config_from_ray_cr(ray_cr))


def node_types_from_gcs_config(config: Any) -> tuple[NodeType, ...]:  # noqa: ANN401 - autoscaler_pb2
    """Node types of the ``autoscaler_pb2.ClusterConfig`` an autoscaler reported to the GCS."""
    return tuple(
        NodeType(
            name=group.name,
            resources=dict(group.resources),
            min_workers=int(group.min_count),
            max_workers=UNLIMITED_WORKERS if group.max_count == -1 else int(group.max_count),
        )
        for group in config.node_group_configs
    )


def describe_cluster() -> ClusterDescription:
    """The connected cluster's resources and, where an autoscaler is found, its node types.

    The readers run in a task on the head node, where the launcher's config file and KubeRay's service
    account are, wherever the driver itself runs (a ``ray://`` client, a laptop).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    resources = {k: float(v) for k, v in ray.cluster_resources().items()}
    head = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and HEAD_RESOURCE in n.get("Resources", {})]
    reader = ray.remote(num_cpus=0)(read_node_types)
    if head:
        reader = reader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head[0], soft=False))
    source, types, notes = ray.get(reader.remote())
    if not types and notes:
        log.info("no autoscaler node types found (%s)", "; ".join(notes))
    return ClusterDescription(resources, types, source, notes)


def read_node_types() -> tuple[str, tuple[NodeType, ...], tuple[str, ...]]:
    """The first source that names node types: (source, node types, why the sources before it failed)."""
    notes: list[str] = []
    for source, read in (
        ("the GCS cluster config", _read_gcs),
        (BOOTSTRAP_CONFIG, _read_bootstrap),
        ("the KubeRay RayCluster", _read_kuberay),
    ):
        try:
            types = read()
        except Exception as exc:  # noqa: BLE001 - a reader that fails leaves the next one to try
            notes.append(f"{source}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if types:
            return source, types, tuple(notes)
    return "ray.cluster_resources()", (), tuple(notes)


def _read_gcs() -> tuple[NodeType, ...]:
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    return node_types_from_gcs_config(config) if config is not None else ()


def _read_bootstrap() -> tuple[NodeType, ...]:
    path = Path(BOOTSTRAP_CONFIG).expanduser()
    if not path.is_file():
        return ()
    return node_types_from_autoscaling_config(yaml.safe_load(path.read_text()) or {})


def _read_kuberay() -> tuple[NodeType, ...]:
    name = os.environ.get("RAY_CLUSTER_NAME")
    namespace_file = Path(K8S_NAMESPACE_FILE)
    if not name or not namespace_file.is_file():
        return ()
    from ray.autoscaler._private.kuberay.node_provider import KubernetesHttpApiClient

    ray_cr = KubernetesHttpApiClient(namespace_file.read_text().strip()).get(f"rayclusters/{name}")
    return node_types_from_ray_cluster_spec(ray_cr["spec"])
