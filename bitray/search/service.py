"""A search service on Ray: long-lived actors hold the shards of a compressed index, warm, and a
coordinator fans each query out to them and merges the top-k. The online serving layer (HTTP) is meant to
sit on ``SearchService``; ``bitray search --address`` uses it when it is up.

    service = SearchService.start("s3://bucket/emb/_index", actors=4)   # detached: outlives this driver
    sims, ids = service.search(vectors, k=10)                            # [q, k] each, nearest first
    table = service.rows_of(ids[0])                                      # path and object version
    SearchService.connect("s3://bucket/emb/_index").stop()

Actors are named from the index URI in the ``bitray-search`` namespace, placed with Ray's ``SPREAD``
strategy (one or more shards each, across nodes). The coordinator follows ``index.json``: before a query
it reads its generation (one small GET) if ``FOLLOW_S`` seconds have passed since the last look, or at
once when the caller names a generation it does not serve; a new one starts new shard servers, warm, and
only then retires the old ones, so an update is served without a restart (the query that finds it waits
for the load). ``reload()`` forces it. Only compressed (``ivfpq``) indices are served.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

from bitray import storage
from bitray.config import StorageConfig
from bitray.errors import BitrayError

NAMESPACE = "bitray-search"
FOLLOW_S = 5.0
"""At most one look at ``index.json`` per this many seconds (besides a caller's generation mismatch)."""


def service_name(index_uri: str) -> str:
    uri = index_uri.rstrip("/")
    uri = uri if storage.is_remote(uri) else str(storage.local_path(uri))
    return "bitray-search-" + hashlib.sha1(uri.encode()).hexdigest()[:12]


class _ShardServer:
    """Holds some shards of one generation, loaded and warm."""

    def __init__(self, uri: str, numbers: list[int], storage_json: str) -> None:
        self.uri, self.numbers, self.storage_json = uri, set(numbers), storage_json
        self.index = _open(uri, self.numbers, storage_json)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None):  # noqa: ANN201
        return self.index.search_codes(queries, k, nprobe)

    def rows_of(self, ids: np.ndarray) -> pa.Table:
        return self.index.rows_of(ids)

    def id_of(self, path: str) -> int | None:
        return self.index.id_of(path)


class _Coordinator:
    """Splits the shards among ``actors`` shard servers and merges their answers."""

    def __init__(self, uri: str, actors: int, storage_json: str, follow_s: float = FOLLOW_S) -> None:
        self.given, self.actors, self.storage_json, self.follow_s = uri, actors, storage_json, follow_s
        self.uri = self._resolved()
        self.servers: list = []
        self.reload()

    def _resolved(self) -> str:
        """The index served: the one given, or the current version's when an output or a collection root
        was given (so a switch of versions is followed like an update)."""
        from bitray.search.index import resolve_index

        config = StorageConfig.model_validate_json(self.storage_json) if self.storage_json else None
        return resolve_index(self.given, config).rstrip("/")

    def follow(self, generation: str | None = None) -> str:
        """Reload when ``index.json`` names another generation: looked at when ``follow_s`` passed since
        the last look, or when ``generation`` (what a caller expects) is not the one served."""
        import time

        now = time.monotonic()
        if (generation is None or generation == self.meta.generation) and now - self.looked < self.follow_s:
            return self.meta.generation
        self.looked = now
        uri = self._resolved()
        if uri != self.uri:  # the collection switched to another version: its index
            self.uri = uri
            return self.reload()
        config = StorageConfig.model_validate_json(self.storage_json) if self.storage_json else None
        data = storage.read_if_exists(storage.join(self.uri, "index.json"), config)
        current = json.loads(data).get("generation") if data else None
        if current and current != self.meta.generation:
            return self.reload()
        return self.meta.generation

    def reload(self) -> str:
        import time

        import ray

        meta = _open(self.uri, None, self.storage_json, warm=False).meta
        numbers = [s["number"] for s in meta.shards]
        groups = [numbers[i :: self.actors] for i in range(min(self.actors, len(numbers)))]
        server = ray.remote(_ShardServer).options(num_cpus=1, scheduling_strategy="SPREAD")
        servers = [server.remote(self.uri, g, self.storage_json) for g in groups]
        ray.get([s.id_of.remote("") for s in servers])  # loaded and warm before they take queries
        for old in self.servers:
            ray.kill(old)
        self.servers, self.meta = servers, meta
        self.looked = time.monotonic()
        self.owner = {n: servers[i] for i, g in enumerate(groups) for n in g}
        return meta.generation

    def served(self):  # noqa: ANN201 - (uri, IndexMeta)
        """The index and the meta of the generation served now (no look at ``index.json``)."""
        return self.uri, self.meta

    def shard_servers(self) -> list:
        return list(self.servers)

    def info(self) -> dict:
        self.follow()
        return {
            "generation": self.meta.generation,
            "shards": len(self.owner),
            "actors": len(self.servers),
            "count": self.meta.count,
            "dim": self.meta.dim,
            "meta": self.meta,
        }

    def search(  # noqa: ANN201
        self, queries: np.ndarray, k: int, nprobe: int | None, generation: str | None = None
    ):
        """Follows ``index.json`` first; ``rows_of`` does not (its ids are of the generation searched)."""
        import ray

        from bitray.search.sharded import merge_top_k

        self.follow(generation)
        parts = ray.get([s.search.remote(queries, k, nprobe) for s in self.servers])
        return merge_top_k(parts, k, len(queries))

    def rows_of(self, ids: np.ndarray) -> pa.Table:
        import ray

        ids = np.asarray(ids, np.int64)
        by_server: dict = {}
        for i, n in enumerate(ids >> 32):
            by_server.setdefault(self.owner[int(n)], []).append(i)
        parts, order = [], []
        for server, where in by_server.items():
            parts.append(ray.get(server.rows_of.remote(ids[where])))
            order.extend(where)
        table = pa.concat_tables(parts)
        return table.take(pa.array(np.argsort(np.array(order), kind="stable")))

    def id_of(self, path: str) -> int | None:
        import ray

        found = [i for i in ray.get([s.id_of.remote(path) for s in self.servers]) if i is not None]
        return found[0] if found else None


class SearchService:
    """The client of a running service: ``search``, ``rows_of``, ``id_of``, ``vectors_of``, ``reload``,
    ``stop``; also usable wherever ``bitray.search.query.search`` takes an index."""

    def __init__(self, uri: str, handle, storage_config: StorageConfig | None = None) -> None:  # noqa: ANN001
        import ray

        self.uri, self.handle, self.storage = uri, handle, storage_config
        self.info = ray.get(handle.info.remote())
        self.meta = self.info["meta"]

    @classmethod
    def start(
        cls,
        index_uri: str,
        *,
        actors: int = 1,
        storage_config: StorageConfig | None = None,
        follow_s: float = FOLLOW_S,
    ) -> SearchService:
        """Start (or find) the service of ``index_uri`` on the connected Ray cluster; it looks at
        ``index.json`` at most every ``follow_s`` seconds."""
        import ray

        found = cls.connect(index_uri, storage_config)
        if found is not None:
            return found
        coordinator = ray.remote(_Coordinator).options(
            name=service_name(index_uri),
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            get_if_exists=True,
        )
        storage_json = storage_config.model_dump_json() if storage_config else ""
        return cls(index_uri, coordinator.remote(index_uri, actors, storage_json, follow_s), storage_config)

    @classmethod
    def connect(cls, index_uri: str, storage_config: StorageConfig | None = None) -> SearchService | None:
        """The running service of ``index_uri`` on the connected cluster, or None."""
        import ray

        try:
            handle = ray.get_actor(service_name(index_uri), namespace=NAMESPACE)
        except ValueError:
            return None
        return cls(index_uri, handle, storage_config)

    def __len__(self) -> int:
        return int(self.info["count"])

    def search(
        self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, generation: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``generation``: one the caller knows is committed (e.g. its own update's): served from it on."""
        import ray

        from bitray.search import vectors

        queries = vectors.normalise(queries)
        if queries.shape[1] != self.info["dim"]:
            raise BitrayError(
                f"query vectors have {queries.shape[1]} dimensions, index {self.uri!r} has {self.info['dim']}"
            )
        return ray.get(self.handle.search.remote(queries, int(k), nprobe, generation))

    def rows_of(self, ids: np.ndarray) -> pa.Table:
        import ray

        return ray.get(self.handle.rows_of.remote(np.asarray(ids, np.int64)))

    def id_of(self, path: str) -> int | None:
        import ray

        return ray.get(self.handle.id_of.remote(path))

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """Exact vectors, read from the embedding Parquet by this process (of the generation served)."""
        import ray

        from bitray.search.sharded import ShardedIndex

        uri, self.meta = ray.get(self.handle.served.remote())
        return ShardedIndex(uri, self.meta, self.storage).vectors_of(ids)

    def reload(self) -> str:
        import ray

        generation = ray.get(self.handle.reload.remote())
        self.info = ray.get(self.handle.info.remote())
        self.meta = self.info["meta"]
        return generation

    def stop(self) -> None:
        import ray

        for server in ray.get(self.handle.shard_servers.remote()):
            ray.kill(server)
        ray.kill(self.handle)


def _open(uri: str, numbers: set[int] | None, storage_json: str, warm: bool = True):  # noqa: ANN202
    from bitray.search.index import load_index
    from bitray.search.sharded import ShardedIndex

    config = StorageConfig.model_validate_json(storage_json) if storage_json else None
    index = load_index(uri, config)
    if not isinstance(index, ShardedIndex):
        raise BitrayError(f"index {uri!r} is {index.meta.kind}: a search service serves compressed indices")
    if numbers is not None:
        index = ShardedIndex(uri, index.meta, config, numbers)
    if warm:
        index.warm()
    return index
