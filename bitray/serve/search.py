"""The search deployment: one index, loaded once per replica, answering by vector or by a path it holds.

Small indices (``flat``, ``ivf``) are held in the replica's memory. A compressed one (``ivfpq``) is served by
``bitray.search.service.SearchService`` (its shard actors, started once and shared by the replicas); the
replica only forwards queries to it. Thumbnails and the bytes of an indexed object are read only for paths
the index holds, and then only through ``IndexReads`` (under the inputs the output's runs recorded, at most
their ``max_bytes``): no request can make the app read any other path.
"""

from __future__ import annotations

import functools
import io
import time
from dataclasses import dataclass

import numpy as np

from bitray import storage
from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.search.index import META_FILE, IndexMeta
from bitray.search.service import FOLLOW_S


@dataclass(frozen=True)
class IndexHeader:
    """An index's ``index.json`` without its vectors: what the ingress needs to decode queries as it did."""

    uri: str
    meta: IndexMeta

    @classmethod
    def read(cls, uri: str, storage_config: StorageConfig | None = None) -> IndexHeader:
        from bitray.search.index import load_index

        meta_uri = storage.join(uri, META_FILE)
        if not storage.exists(meta_uri, storage_config):
            load_index(uri, storage_config)  # raises the one message for "no index here"
        return cls(uri, IndexMeta.from_json(storage.read_bytes(meta_uri, storage_config), uri))

    def decode(self, storage_config: StorageConfig | None = None) -> str:
        from bitray.search.query import query_decode

        return query_decode(self, storage_config)  # type: ignore[arg-type]  # reads .uri and .meta only


class SearchServer:
    """Neighbours of a vector or of an indexed path; thumbnails and bytes of indexed paths.

    ``index_uri`` may be an index, an output or a collection root: the server follows ``index.json`` and the
    collection's current version (a look at most every ``follow_s`` seconds), so an index update or a
    switch of versions is served without a restart. A switch to a version of another model is refused for
    queries by image (the app's model made their vectors) until the app is redeployed with it."""

    def __init__(
        self, index_uri: str, *, thumbnail_px: int = 256, storage_json: str = "", follow_s: float = FOLLOW_S
    ) -> None:
        self.given, self.thumbnail_px, self.follow_s = index_uri, thumbnail_px, follow_s
        self.storage = StorageConfig.model_validate_json(storage_json) if storage_json else None
        self._open(self._look())

    def _look(self) -> tuple[str, str | None]:
        """(the index to serve, its committed generation): 2-5 small requests."""
        from bitray.search.index import resolve_index

        uri = resolve_index(self.given, self.storage)
        data = storage.read_if_exists(storage.join(uri, META_FILE), self.storage)
        return uri, (IndexMeta.from_json(data, uri).generation if data else None)

    def _open(self, served: tuple[str, str | None]) -> None:
        from bitray.search.index import load_index
        from bitray.search.scope import IndexReads
        from bitray.search.sharded import ShardedIndex

        index = load_index(served[0], self.storage)
        if isinstance(index, ShardedIndex):
            from bitray.search.service import SearchService

            # named by the URI given: a service of a collection root follows its switches itself
            index = SearchService.start(self.given.rstrip("/"), storage_config=self.storage)
        self.index, self.meta, self.served = index, index.meta, served
        self.reads = IndexReads.of_output(self.meta.embeddings, self.storage)
        self._thumbnail = functools.lru_cache(maxsize=256)(self._make_thumbnail)
        self.looked = time.monotonic()

    def _follow(self) -> None:
        if time.monotonic() - self.looked < self.follow_s:
            return
        self.looked = time.monotonic()
        served = self._look()
        if served != self.served:
            self._open(served)

    def describe(self) -> dict:
        self._follow()
        return {"count": int(self.meta.count), "dim": int(self.meta.dim), "kind": self.meta.kind,
                "model": self.meta.model_id}  # fmt: skip

    def holds(self, path: str) -> bool:
        self._follow()
        try:
            return self.index.id_of(_normal(path)) is not None
        except (ValueError, OSError):  # not a path at all (a NUL byte, say)
            return False

    def by_vector(self, vector: np.ndarray, k: int, model_id: str | None = None) -> list[dict] | str:
        """Neighbours of a vector made by ``model_id``; the reason instead when the index now holds
        vectors of another model (a collection switched to a version the app does not serve)."""
        from bitray.search.query import neighbours_table

        self._follow()
        if model_id is not None and self.meta.model_id and model_id != self.meta.model_id:
            return (
                f"the index now holds vectors of {self.meta.model_id!r} and this app embeds with "
                f"{model_id!r}; redeploy bitray serve for the new model, or search by path"
            )

        sims, ids = self.index.search(np.asarray(vector, np.float32).reshape(1, -1), k)
        keep = ids[0] >= 0
        return _neighbours(neighbours_table(self.index, sims[0][keep], ids[0][keep]))

    def by_path(self, path: str, k: int) -> list[dict] | None:
        """Neighbours of an indexed object (itself left out); None when the index does not hold ``path``."""
        from bitray.search.query import search

        if not self.holds(path):
            return None
        return _neighbours(search(self.index, path=path, k=k, storage_config=self.storage))

    def image(self, path: str) -> bytes | str | None:
        """The bytes of an indexed object (read under the output's inputs), the reason it cannot be read
        (it changed or vanished since it was indexed), or None when the index does not hold ``path``."""
        if not self.holds(path):
            return None
        try:
            return self.reads.read(_normal(path))
        except BitrayError as exc:
            return f"{type(exc).__name__}: {exc}"

    def thumbnail(self, path: str) -> bytes | str | None:
        """A small JPEG of an indexed object, the reason it cannot be made, or None when not indexed."""
        if not self.holds(path):
            return None
        try:
            return self._thumbnail(_normal(path))
        except BitrayError as exc:
            return f"{type(exc).__name__}: {exc}"

    def _make_thumbnail(self, path: str) -> bytes:
        from bitray.search.sheet import thumbnail

        out = io.BytesIO()
        thumbnail(self.reads.read(path), self.thumbnail_px).save(out, "JPEG", quality=85)
        return out.getvalue()


def _neighbours(table) -> list[dict]:  # noqa: ANN001 - a pyarrow table from bitray.search.query
    columns = ("path", "similarity", "width", "height")
    rows = table.select([c for c in columns if c in table.column_names]).to_pylist()
    return [{**row, "similarity": round(float(row["similarity"]), 6)} for row in rows]


def _normal(uri: str) -> str:
    return uri if storage.is_remote(uri) else str(storage.local_path(uri))
