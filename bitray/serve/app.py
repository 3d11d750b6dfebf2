"""The Serve application from a ``ServeConfig``: deployments, their resources, and the ``serve deploy`` file.

    app = build(config)                      # an Application for serve.run
    serve_config(config)                     # {"http_options": ..., "applications": [...]} for serve deploy

``build`` is also the application builder of ``serve deploy``: ``import_path: bitray.serve.app:build`` with
``args:`` the ``ServeConfig`` keys. Deployments: ``embedder`` (and ``classifier``): one ``ModelServer``
each, autoscaling between ``replicas_min`` and ``replicas_max``, a GPU per replica when the cluster has (or
can add) GPUs, the same decision the embedding actors make (``bitray.embed.resources.wants_gpus``);
``search``: the index, one replica; ``ingress``: HTTP, decoding, limits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve import Application

from bitray.errors import BitrayError
from bitray.search.index import resolve_index
from bitray.serve.api import Ingress, Limits
from bitray.serve.config import ServeConfig
from bitray.serve.models import ModelServer
from bitray.serve.search import IndexHeader, SearchServer

log = logging.getLogger(__name__)

APP_NAME = "bitray"
INGRESS_CPUS = 0.5
"""The ingress decodes (Pillow, a thread per request in flight) and waits on the models: half a core
reserved lets it share a small node with a model replica."""
SEARCH_CPUS = 0.25


@dataclass(frozen=True)
class ReplicaResources:
    gpus: float
    cpus: float
    threads: int


def replica_resources(config: ServeConfig) -> ReplicaResources:
    """One GPU per model replica where the cluster has (or its autoscaler can add) GPUs; else one CPU
    reserved and TensorFlow threads for two (the decode runs in the ingress, lighter than a forward pass)."""
    gpus = config.gpus_per_replica
    if gpus is None:
        from bitray.embed.cluster import describe_cluster
        from bitray.embed.resources import wants_gpus

        gpus = 1.0 if wants_gpus(describe_cluster()) else 0.0
    return ReplicaResources(gpus, 1.0, 1 if gpus else 2)


def build(args: dict[str, Any] | ServeConfig) -> Application:
    """The application (also ``serve deploy``'s builder: ``args`` are ``ServeConfig`` keys)."""
    config = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args)
    storage_json = config.storage.model_dump_json()
    # an output or a collection root: the model of its current index (the search server follows it, and the
    # ingress decodes queries as the index it serves)
    index_uri = resolve_index(config.index, config.storage) if config.index else None
    header = IndexHeader.read(index_uri, config.storage) if index_uri else None
    model = config.model or (header.meta.model_spec if header else None)
    if model is None:
        raise BitrayError("bitray serve needs --model SPEC, or --index URI to serve the index's own model")
    resources = replica_resources(config)
    embedder = _model_deployment("embedder", config, resources).bind(
        model, task="embed", threads=resources.threads, batch_size=config.batch_size,
        batch_wait_s=config.batch_wait_s, storage_json=storage_json,
        expect_model_id=header.meta.model_id if header else None,
        warm_size=tuple(header.meta.image_size) if header else None,
    )  # fmt: skip
    classifier = None
    if config.classifier:
        classifier = _model_deployment("classifier", config, resources).bind(
            config.classifier, task="classify", threads=resources.threads, batch_size=config.batch_size,
            batch_wait_s=config.batch_wait_s, storage_json=storage_json,
        )  # fmt: skip
    searcher = None
    if config.index:
        searcher = (
            serve.deployment(SearchServer)
            .options(name="search", num_replicas=1, ray_actor_options={"num_cpus": SEARCH_CPUS})
            .bind(
                config.index,
                thumbnail_px=config.thumbnail_px,
                storage_json=storage_json,
                follow_s=config.follow_s,
            )  # fmt: skip
        )
    limits = Limits(
        exact=config.decode == "exact",
        image_size=config.image_size,
        max_bytes=config.max_bytes,
        k_max=config.k_max,
        k_default=min(config.k_default, config.k_max),
        max_pixels=config.max_pixels,
        max_decode_bytes=config.max_decode_mb * 2**20,
        follow_s=config.follow_s,
    )
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        max_ongoing_requests=config.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": config.replicas_min,
            "max_replicas": max(config.replicas_min, config.replicas_max),
            "target_ongoing_requests": max(1, config.max_ongoing_requests // 2),
        },
        ray_actor_options={"num_cpus": INGRESS_CPUS},
    )
    return ingress.bind(embedder, classifier, searcher, limits)


def _model_deployment(name: str, config: ServeConfig, resources: ReplicaResources):  # noqa: ANN202
    """A model's deployment: a replica holds twice a batch (one computing, one filling) and autoscales on
    a batch's worth of requests in flight."""
    return serve.deployment(ModelServer).options(
        name=name,
        max_ongoing_requests=2 * config.batch_size,
        autoscaling_config={
            "min_replicas": config.replicas_min,
            "max_replicas": max(config.replicas_min, config.replicas_max),
            "target_ongoing_requests": config.batch_size,
        },
        ray_actor_options={"num_cpus": resources.cpus, "num_gpus": resources.gpus},
    )


def serve_config(config: ServeConfig) -> dict:
    """A ``serve deploy`` config running the same application (``bitray.serve.app:build``)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.host, "port": config.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "bitray.serve.app:build",
                "args": config.model_dump(mode="json", exclude_defaults=True, exclude={"host", "port"}),
            }
        ],
    }
