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


@dataclass(frozen=True)
class Pending:
    """A switch held back: the current version's index, its meta, and when it was seen (its ``since``)."""

    uri: str
    meta: IndexMeta
    since: float


class SearchServer:
    """Neighbours of a vector or of an indexed path; thumbnails and bytes of indexed paths.

    ``index_uri`` may be an index, an output or a collection root: the server follows ``index.json`` and the
    collection's current version (a look at most every ``follow_s`` seconds), so an index update or a
    switch of versions is served without a restart. A switch to a version of another model is held back
    (``pending``) and the old version served whole (by path and by image) until the ingress has the new
    model loaded in the embedder and calls ``promote``: the app serves one version at a time, and a model
    that cannot load (``refuse``) leaves it on the old version, saying why (``describe``)."""

    def __init__(
        self, index_uri: str, *, thumbnail_px: int = 256, storage_json: str = "", follow_s: float = FOLLOW_S
    ) -> None:
        self.given, self.thumbnail_px, self.follow_s = index_uri, thumbnail_px, follow_s
        self.storage = StorageConfig.model_validate_json(storage_json) if storage_json else None
        self.pending: Pending | None = None
        """The current version's index when it holds vectors of another model than the one served."""
        self.problem: str | None = None
        """Why the pending version's model could not be loaded (``refuse``), until it is."""
        self.index, self.owned = None, False
        self._open(self._look())

    def _look(self) -> tuple[str, str | None, IndexMeta | None]:
        """(the index to serve, its committed generation, its meta): 2-5 small requests."""
        from bitray.search.index import resolve_index

        uri = resolve_index(self.given, self.storage)
        data = storage.read_if_exists(storage.join(uri, META_FILE), self.storage)
        meta = IndexMeta.from_json(data, uri) if data else None
        return uri, (meta.generation if meta else None), meta

    def _open(self, look: tuple[str, str | None, IndexMeta | None]) -> None:
        from bitray.search.index import load_index
        from bitray.search.scope import IndexReads
        from bitray.search.sharded import ShardedIndex

        index, owned = load_index(look[0], self.storage), False
        if isinstance(index, ShardedIndex):
            from bitray.search.service import SearchService

            # named by the index served, not the root: a switch of models waits for ``promote``
            same = self.index is not None and self.served[0] == look[0]
            owned = (self.owned and same) or SearchService.connect(look[0], self.storage) is None
            index = SearchService.start(look[0], storage_config=self.storage)
        if self.owned and self.index is not None and self.served[0] != look[0]:
            self.index.stop()  # the service this server started for the version served before
        if self.index is None or self.meta.model_id != index.meta.model_id:
            self.since = self.pending.since if self.pending else time.time()
        self.index, self.meta, self.served, self.owned = index, index.meta, look[:2], owned
        self.decode = IndexHeader(look[0], self.meta).decode(self.storage)
        self.pending = self.problem = None
        self.reads = IndexReads.of_output(self.meta.embeddings, self.storage)
        self._thumbnail = functools.lru_cache(maxsize=256)(self._make_thumbnail)
        self.looked = time.monotonic()

    def _follow(self) -> None:
        if time.monotonic() - self.looked < self.follow_s:
            return
        self.looked = time.monotonic()
        look = self._look()
        if look[:2] == self.served:
            self.pending = self.problem = None  # switched back before the new model was promoted
        elif look[2] is None:
            pass  # switched to a version without an index yet (by hand): the one served stays
        elif look[2] is not None and self.meta.model_id and look[2].model_id != self.meta.model_id:
            if self.pending is None or self.pending.uri != look[0]:
                self.pending, self.problem = Pending(look[0], look[2], time.time()), None
        else:
            self._open(look)

    def promote(self, model_id: str) -> dict:
        """Serve the pending version now that the embedder runs ``model_id`` (its vectors' model)."""
        self.looked = 0.0
        self._follow()
        if self.pending is not None and self.pending.meta.model_id == model_id:
            self._open((self.pending.uri, self.pending.meta.generation, self.pending.meta))
        return self.describe()

    def refuse(self, model_id: str, reason: str) -> dict:
        """The pending version's model cannot be loaded: keep serving this one, and say why."""
        if self.pending is not None and self.pending.meta.model_id == model_id:
            self.problem = reason
        return self.describe()

    def describe(self) -> dict:
        """What is served (count, kind, the model of its vectors and how queries decode) and what waits."""
        self._follow()
        pending = self.pending
        return {
            "count": int(self.meta.count), "dim": int(self.meta.dim), "kind": self.meta.kind,
            "index": self.served[0], "model": self.meta.model_id, "spec": self.meta.model_spec,
            "since": self.since, "image_size": list(self.meta.image_size), "decode": self.decode,
            "pending": {"index": pending.uri, "model": pending.meta.model_id, "spec": pending.meta.model_spec,
                        "since": pending.since, "image_size": list(pending.meta.image_size)}
            if pending else None,
            "problem": self.problem,
        }  # fmt: skip

    def holds(self, path: str) -> bool:
        self._follow()
        try:
            return self.index.id_of(_normal(path)) is not None
        except (ValueError, OSError):  # not a path at all (a NUL byte, say)
            return False

    def by_vector(self, vector: np.ndarray, k: int, model_id: str | None = None) -> list[dict] | str:
        """Neighbours of a vector made by ``model_id``; the reason instead when the index served holds
        vectors of another model (a query embedded just before ``promote``)."""
        from bitray.search.query import neighbours_table

        self._follow()
        if model_id is not None and self.meta.model_id and model_id != self.meta.model_id:
            return (
                f"the index now holds vectors of {self.meta.model_id!r}, not of {model_id!r} (the app's "
                "model is being switched); ask again"
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
