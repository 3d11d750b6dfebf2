"""A nearest-neighbour index over an embedding output: build, update incrementally, store, load.

**Library: faiss** (faiss-cpu). It is the reference implementation of both exact and IVF search, is kept up
by Meta with wheels for every platform, serialises an index to one byte string (so any ``bitray.storage``
URI can hold it), and supports removing vectors by id, which the replacement of a changed object needs.
usearch is HNSW only (no exact mode, removals leave tombstones); Lance would bring a second storage format
beside our Parquet.

**Index type.** Below ``exact_below`` vectors (20,000 by default) an exact ``IndexFlatIP`` (in an
``IndexIDMap2``, for our own ids): a query scans every vector, which takes a few milliseconds there, and is
never wrong. From there, ``IndexIVFFlat``: k-means cells (``nlist = 2 sqrt(n)``), a query scans the
``nprobe`` nearest cells with exact inner products, so recall is set by ``nprobe`` alone and vectors keep
full precision (no PQ error to refine away). It supports ``remove_ids`` and adding without retraining.
HNSW was rejected: it cannot remove vectors, and its build on 2,048-d vectors is far slower than IVF's.
IVF-Flat keeps every vector in memory (8 KiB each at 2,048-d: 1.6 GB for 200k), so it is used only while
it fits ``--max-index-memory`` (2 GiB by default). Vectors are L2-normalised, so inner product is cosine.

**At bucket scale** (``ivfpq``, issue 17): past the budget the index is compressed and sharded
(``bitray.search.params`` chooses ``PCAR<d>,IVF<n>,PQ<m>`` from the count and the budget: 136 bytes a
vector with its id at most, 12.7 GiB for 100M), built by Ray tasks one file group each
(``bitray.search.shards``, ``bitray.search.build``), committed by compare-and-swap of ``index.json``
(``bitray.search.commit``), opened without loading it whole (``bitray.search.sharded``) and served by Ray
actors (``bitray.search.service``). Still faiss: its IVF-PQ, PCA rotation, ``IDSelector`` masks and
``HStackInvertedLists`` do all of it; the code here only cuts files into shards and commits them.
autofaiss (parameter choice under a memory budget) is reproduced by ``params.choose`` rather than
depended on: it pins its own faiss and drives PySpark for distributed builds, where bitray has Ray. Lance
(``pylance``/``lance-ray``) would bring a second storage format beside our Parquet. Neither was measured
on this machine (the 2-core host was shared and loaded 20x). Measured with faiss at 200k realistic 2048-d
vectors (``bench/search_bench.py --scale``, 136 B a vector): ``PCAR256,IVF840,PQ128`` recall@10 0.901
(1.000 re-ranking 50 from the Parquet), ``PCAR512,...,PQ128`` 0.851; ``OPQ128_512`` did not finish
training within 5 minutes there. Polysemous training is switched off: it was most of PQ's training time.

**Incremental.** The index records the finished runs it covers. ``update_index`` adds the rows of newer
finished runs only; a path they embed again (the object changed) has its old vector removed first. The
index is rebuilt from the Parquet instead when it would cross ``exact_below`` (flat -> IVF) or has grown
past 4x the vectors its cells were trained on.

**Storage** under the index URI (default ``OUT/_index``, hidden from Parquet dataset readers of ``OUT``)::

    index.json                  what the index holds (``IndexMeta``): written last, the commit point
    vectors-<generation>.faiss  the faiss index
    rows-<generation>.parquet   id, path, etag, size, mtime, run_id, width, height of every vector

Each update writes a new generation and then ``index.json``; readers only follow ``index.json``, so they
never see a half-written index. A compressed index keeps ``trained-<key>.faiss``, ``shards/<name>.*`` and
``masked-<generation>.npy`` instead (see ``bitray.search.shards``), and two updates of it at once end
with one committed and the other failed with its files removed; for the flat and IVF-Flat kinds the last
to write ``index.json`` still wins.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import NonNegativeInt, PositiveInt, TypeAdapter, ValidationError

from bitray import outputs, storage
from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.search import vectors
from bitray.search.build import deletions, update_sharded
from bitray.search.params import DEFAULT_MAX_INDEX_MEMORY, choose
from bitray.search.shards import FILES_PER_SHARD
from bitray.search.vectors import ROWS_SCHEMA

log = logging.getLogger(__name__)
# faiss's loader logs each CPU-specific module it does not find at INFO; the wheel dispatches at run time
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

FORMAT_VERSION = 1
META_FILE = "index.json"
EXACT_BELOW = 20_000
RETRAIN_GROWTH = 4
TRAIN_PER_CELL = 40
"""Training vectors per IVF cell (faiss warns below 39)."""


@dataclass
class IndexMeta:
    """``index.json``: which output, model and runs an index covers, and how it is built.

    The annotations are checked (pydantic) when an ``index.json`` is read (``from_json``)."""

    embeddings: str
    model_id: str
    model_spec: str
    image_size: tuple[PositiveInt, PositiveInt]
    dim: PositiveInt
    kind: Literal["flat", "ivf", "ivfpq"]  # exact, IVF-Flat, or sharded and compressed (search.shards)
    runs: list[str]
    count: NonNegativeInt
    next_id: NonNegativeInt
    generation: str
    nlist: PositiveInt | None = None
    nprobe: PositiveInt | None = None
    trained_on: PositiveInt | None = None
    decode: Literal["fast", "exact"] | None = None
    """How the output decoded its images, so a query image decodes the same way; None in an index built
    before it was recorded (search then asks the output)."""
    updated: str = ""
    version: int = FORMAT_VERSION
    factory: str | None = None
    """ivfpq: the faiss factory string of the quantiser, e.g. ``PCAR512,IVF1680,PQ128``."""
    template: str | None = None
    train_error: float | None = None
    shards: list[dict] | None = None
    masked: str | None = None
    previous_masked: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> IndexMeta:
        """The meta of index ``uri``; ``BitrayError`` (naming the file and the fix) when it is not one."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _corrupt(uri, f"not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise _corrupt(uri, f"a JSON {type(raw).__name__}, not an object")
        if raw.get("version") != FORMAT_VERSION:
            raise BitrayError(f"index {uri!r} has format {raw.get('version')}; rebuild it with bitray index")
        try:
            return _META.validate_python(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors()[:3]
            )
            raise _corrupt(uri, problems) from None


_META = TypeAdapter(IndexMeta)


def _corrupt(uri: str, problem: str) -> BitrayError:
    return BitrayError(
        f"{storage.join(uri, META_FILE)} is not a valid bitray index ({problem}); delete {uri} and rebuild "
        f"it with bitray index --embeddings OUT --index {uri}"
    )


@dataclass(frozen=True)
class IndexOptions:
    """How ``update_index`` builds: exact below ``exact_below`` vectors, IVF-Flat from there."""

    exact_below: int = EXACT_BELOW
    nprobe: int | None = None
    """IVF cells scanned per query; default 15% of them, at least 16 (ivfpq: 5%, at least 16)."""
    seed: int = 0
    max_index_memory: int = DEFAULT_MAX_INDEX_MEMORY
    """Bytes the index may take in memory: IVF-Flat while its full vectors fit, compressed from there."""
    files_per_shard: int = FILES_PER_SHARD
    address: str | None = None
    """Ray cluster of a compressed build (default: RAY_ADDRESS, else a local Ray)."""

    def __post_init__(self) -> None:
        if self.exact_below < 1:
            raise BitrayError(f"exact_below {self.exact_below}: give a number of vectors >= 1")
        if self.nprobe is not None and self.nprobe < 1:
            raise BitrayError(f"nprobe {self.nprobe}: an IVF query scans at least 1 cell")


@dataclass
class UpdateReport:
    """What one ``update_index`` call did."""

    index: str
    kind: str
    count: int
    added: int
    replaced: int
    new_runs: list[str] = field(default_factory=list)
    rebuilt: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def default_index_uri(embeddings: str) -> str:
    return storage.join(embeddings, "_index")


class SearchIndex:
    """A loaded index: the faiss index, its rows (id -> path and object version) and its meta."""

    def __init__(self, uri: str, meta: IndexMeta, index, rows: pa.Table) -> None:  # noqa: ANN001 - faiss
        self.uri = uri
        self.meta = meta
        self.index = index
        self.rows = rows
        ids = rows.column("id").to_numpy()
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        self._by_path: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.rows.num_rows

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Row positions in ``rows`` of faiss ids (all must be present)."""
        return self._order[np.searchsorted(self._sorted_ids, ids)]

    def id_of(self, path: str) -> int | None:
        if self._by_path is None:
            self._by_path = {p: i for i, p in enumerate(self.rows.column("path").to_pylist())}
        position = self._by_path.get(path)
        return None if position is None else int(self.rows.column("id")[position].as_py())

    def rows_of(self, ids: np.ndarray) -> pa.Table:
        """The rows of faiss ids, in their order."""
        return self.rows.take(pa.array(self.positions(np.asarray(ids, np.int64))))

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """The stored (unit-length) vectors of faiss ids."""
        return self.index.reconstruct_batch(np.asarray(ids, np.int64))

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities [q, k], ids [q, k])`` of the nearest stored vectors; id -1 where fewer exist."""
        queries = vectors.normalise(queries)
        if queries.shape[1] != self.meta.dim:
            raise BitrayError(
                f"query vectors have {queries.shape[1]} dimensions, index {self.uri!r} has {self.meta.dim}"
            )
        if nprobe is not None and nprobe < 1:
            raise BitrayError(f"nprobe {nprobe}: an IVF query scans at least 1 cell")
        if self.meta.kind == "ivf":
            self.index.nprobe = int(nprobe or self.meta.nprobe or 16)
        # faiss allocates k results per query up front: never ask for more than the index holds
        return self.index.search(queries, min(int(k), max(1, self.index.ntotal)))


def resolve_index(uri: str, storage_config: StorageConfig | None = None) -> str:
    """``uri`` when an index is there, else the current version's index when ``uri`` names an output or a
    collection root (``ROOT/_bitray/current``): what a reader that follows a switch opens (2-4 HEADs)."""
    if storage.exists(storage.join(uri, META_FILE), storage_config):
        return uri
    marks = (storage.join(uri, "_bitray", "current"), storage.join(uri, "_bitray", "state", "current.json"))
    if any(storage.exists(mark, storage_config) for mark in marks):
        return default_index_uri(outputs.data_path(uri, storage_config))
    return uri


def load_index(uri: str, storage_config: StorageConfig | None = None):  # noqa: ANN201 - or a ShardedIndex
    """Read an index written by ``update_index``; ``BitrayError`` when there is none at ``uri``. A
    compressed one (``ivfpq``) is opened lazily: shards are mapped when a query needs them."""
    import faiss

    meta_uri = storage.join(uri, META_FILE)
    if not storage.exists(meta_uri, storage_config):
        raise BitrayError(
            f"no index at {uri!r} ({META_FILE} is missing); build one with "
            "bitray index --embeddings OUT --index URI"
        )
    meta = IndexMeta.from_json(storage.read_bytes(meta_uri, storage_config), uri)
    if meta.kind == "ivfpq":
        from bitray.search.sharded import ShardedIndex

        return ShardedIndex(uri, meta, storage_config)
    data = storage.read_bytes(storage.join(uri, f"vectors-{meta.generation}.faiss"), storage_config)
    try:
        index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
        # a BufferReader, not io.BytesIO: Arrow's read-ahead threads would call into a Python file object,
        # and one still doing so when the interpreter exits aborts the process ("terminate called")
        rows = pq.read_table(
            pa.BufferReader(storage.read_bytes(_rows_uri(uri, meta.generation), storage_config))
        )
    except (RuntimeError, pa.ArrowException) as exc:
        raise _corrupt(uri, f"generation {meta.generation} cannot be read: {exc}") from None
    if set(ROWS_SCHEMA.names) - set(rows.schema.names) or not index.ntotal == rows.num_rows == meta.count:
        raise _corrupt(
            uri, f"{index.ntotal} vectors, {rows.num_rows} rows and a count of {meta.count} do not agree"
        )
    if index.d != meta.dim:
        raise _corrupt(uri, f"its vectors have {index.d} dimensions, {META_FILE} says {meta.dim}")
    return SearchIndex(uri, meta, index, rows)


def update_index(
    embeddings: str,
    index_uri: str | None = None,
    *,
    storage_config: StorageConfig | None = None,
    options: IndexOptions | None = None,
) -> UpdateReport:
    """Build the index of ``embeddings`` at ``index_uri``, or add to it the runs finished since the last call.

    Objects that a newer incremental embedding run found deleted (``bitray.outputs.deleted_paths``) are
    removed (flat, IVF-Flat) or masked (compressed): they are not returned after the update.

    Raises ``BitrayError`` when the output has no finished run, when its runs used different models or
    image sizes, or when the index was built from another output or model.
    """
    started = time.monotonic()
    options = options or IndexOptions()
    embeddings = _absolute(outputs.data_path(embeddings, storage_config))  # a collection: its current version
    index_uri = _absolute(index_uri or default_index_uri(embeddings))
    runs = outputs.finished_runs(embeddings, storage_config)
    if not runs:
        raise BitrayError(
            f"{embeddings!r} holds no finished embedding run; run bitray embed --output {embeddings} first"
        )
    existing = None
    if storage.exists(storage.join(index_uri, META_FILE), storage_config):
        existing = load_index(index_uri, storage_config)
        if existing.meta.embeddings != embeddings:
            raise BitrayError(
                f"index {index_uri!r} was built from {existing.meta.embeddings!r}, not {embeddings!r}; "
                "give each embedding output its own --index"
            )
    covered = set(existing.meta.runs) if existing else set()
    new_runs = [run for run in runs if run not in covered]
    settings = _common_model(embeddings, existing, storage_config)
    if existing and not new_runs:
        return UpdateReport(index_uri, existing.meta.kind, len(existing), 0, 0, [], False, 0.0)
    new_files = outputs.committed_files(embeddings, "embeddings", storage_config, new_runs)
    grown = (len(existing) if existing else 0) + vectors.count_rows(new_files, storage_config)
    sharded = existing is not None and existing.meta.kind == "ivfpq"
    dim = existing.meta.dim if existing else _first_dim(new_files, storage_config)
    params = choose(grown, dim, options.max_index_memory, options.exact_below, options.nprobe)
    if sharded or params.kind == "ivfpq":
        return _update_sharded(
            embeddings,
            index_uri,
            existing,
            runs,
            new_runs,
            settings,
            dim,
            options,
            storage_config,
            started,
        )
    rebuild = existing is None or _needs_rebuild(existing.meta, grown, options)
    builder = _Builder(embeddings, index_uri, storage_config, options)
    if rebuild:
        built = builder.build(runs, settings)
        added, replaced = len(built), 0
    else:
        existing.meta.decode = settings.decode
        built, added, replaced = builder.extend(existing, runs, new_runs)
    builder.store(built, existing.meta.generation if existing else None)
    report = UpdateReport(
        index=index_uri,
        kind=built.meta.kind,
        count=len(built),
        added=added,
        replaced=replaced,
        new_runs=new_runs,
        rebuilt=rebuild,
        seconds=round(time.monotonic() - started, 3),
    )
    log.info("index %s: %s", index_uri, report)
    return report


def _update_sharded(
    embeddings: str,
    index_uri: str,
    existing,  # noqa: ANN001 - a SearchIndex or ShardedIndex
    runs: list[str],
    new_runs: list[str],
    settings: outputs.OutputSettings,
    dim: int,
    options: IndexOptions,
    storage_config: StorageConfig | None,
    started: float,
) -> UpdateReport:
    """Build or update a compressed index (``bitray.search.build``)."""

    all_files = outputs.committed_files(embeddings, "embeddings", storage_config, runs)
    count = vectors.count_rows(all_files, storage_config)
    params = choose(count, dim, options.max_index_memory, 0, options.nprobe, compressed=True)
    base = asdict(
        IndexMeta(
            embeddings=embeddings,
            model_id=settings.model_id or "",
            model_spec=settings.model,
            image_size=settings.image_size,
            decode=settings.decode,
            dim=dim,
            kind="ivfpq",
            runs=[],
            count=0,
            next_id=0,
            generation="",
        )
    )
    meta, added, replaced, rebuilt = update_sharded(
        embeddings,
        index_uri,
        asdict(existing.meta) if existing else None,
        runs,
        new_runs,
        params,
        seed=options.seed,
        files_per_shard=options.files_per_shard,
        address=options.address,
        storage_config=storage_config,
        base=base,
    )
    report = UpdateReport(
        index_uri,
        "ivfpq",
        meta["count"],
        added,
        replaced,
        [r for r in runs if r in new_runs],
        rebuilt,
        round(time.monotonic() - started, 3),
    )
    log.info("index %s: %s", index_uri, report)
    return report


def _first_dim(files: list[str], storage_config: StorageConfig | None) -> int:
    for batch in vectors.read_batches(files[:1], ("embedding",), storage_config, batch_rows=1):
        return batch.column(0).type.list_size
    return 0


def _needs_rebuild(meta: IndexMeta, grown: int, options: IndexOptions) -> bool:
    if meta.kind == "flat":
        return grown >= options.exact_below
    return grown > RETRAIN_GROWTH * (meta.trained_on or 0)


def _common_model(
    embeddings: str, existing: SearchIndex | None, storage_config: StorageConfig | None
) -> outputs.OutputSettings:
    """The one model, image size and decode of the output's rows, and of the index; a clear error when
    the output mixes them (``bitray.outputs.settings``) or the index was built with others."""
    settings = outputs.settings(embeddings, storage_config)
    if settings is None:
        raise BitrayError(f"{embeddings!r} holds no embedded image yet; nothing to index")
    if existing is not None:
        meta = existing.meta
        mine = (meta.model_spec, meta.image_size, meta.decode or settings.decode)
        theirs = (settings.model, settings.image_size, settings.decode)
        if mine != theirs:
            raise BitrayError(
                f"index {existing.uri!r} holds vectors of {_describe(*mine)}, but {embeddings!r} now holds "
                f"rows of {_describe(*theirs)}; an index holds one model's vectors: rebuild it (remove it "
                "and run bitray index again)"
            )
    return settings


def _describe(spec: str, size: tuple[int, int], decode: str) -> str:
    return f"{spec} at {size[0]}x{size[1]} ({decode} decode)"


class _Builder:
    """Reads the output's live rows into a faiss index; one instance per ``update_index`` call."""

    def __init__(
        self, embeddings: str, index_uri: str, storage_config: StorageConfig | None, options: IndexOptions
    ) -> None:
        self.embeddings = embeddings
        self.index_uri = index_uri
        self.storage = storage_config
        self.options = options
        self.model_id: str | None = None

    def build(self, runs: list[str], settings: outputs.OutputSettings) -> SearchIndex:
        files = outputs.committed_files(self.embeddings, "embeddings", self.storage, runs)
        newest = vectors.newest_versions(files, runs, self.storage)
        vectors.drop_deleted(newest, runs, deletions(self.embeddings, runs, self.storage))
        count = len(newest)
        if count == 0:
            raise BitrayError(f"{self.embeddings!r} holds no embedded image yet; nothing to index")
        dim = self._dim(files)
        meta = IndexMeta(
            embeddings=self.embeddings,
            model_id="",
            model_spec=settings.model,
            image_size=settings.image_size,
            decode=settings.decode,
            dim=dim,
            kind="flat" if count < self.options.exact_below else "ivf",
            runs=list(runs),
            count=0,
            next_id=0,
            generation="",
        )
        index = self._empty(meta, files, newest, count)
        rows = self._add(index, meta, files, newest)
        meta.model_id = self.model_id or ""
        return SearchIndex(self.index_uri, meta, index, rows)

    def extend(
        self, existing: SearchIndex, runs: list[str], new_runs: list[str]
    ) -> tuple[SearchIndex, int, int]:
        """Add the live rows of ``new_runs``, removing the older vectors of paths they embed again or found
        deleted."""
        self.model_id = existing.meta.model_id
        files = outputs.committed_files(self.embeddings, "embeddings", self.storage, new_runs)
        newest = vectors.newest_versions(files, new_runs, self.storage)
        deleted = deletions(self.embeddings, new_runs, self.storage)
        gone = set().union(*deleted.values()) if deleted else set()
        vectors.drop_deleted(newest, new_runs, deleted)
        old_paths = existing.rows.column("path")
        superseded = pc.is_in(old_paths, value_set=pa.array(list(gone | set(newest)), pa.string()))
        stale = existing.rows.filter(superseded).column("id").to_numpy()
        if len(stale):
            existing.index.remove_ids(np.asarray(stale, np.int64))
        meta = existing.meta
        meta.runs = list(runs)
        if meta.kind == "ivf" and self.options.nprobe:
            meta.nprobe = self.options.nprobe
        added_rows = self._add(existing.index, meta, files, newest)
        kept = existing.rows.filter(pc.invert(superseded))
        rows = pa.concat_tables([kept, added_rows])
        return SearchIndex(self.index_uri, meta, existing.index, rows), added_rows.num_rows, len(stale)

    def store(self, built: SearchIndex, previous: str | None) -> None:
        """Write a new generation, then ``index.json`` (the commit point), then drop the ``previous`` one.

        Only the generation this update started from is deleted: files of a concurrent update are left
        alone (at worst an orphan remains), so a reader never loses the files its ``index.json`` names
        to anything but a later update."""
        import faiss

        meta = built.meta
        meta.generation = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
        meta.count = len(built)
        meta.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data = faiss.serialize_index(built.index)
        storage.write_bytes(
            storage.join(self.index_uri, f"vectors-{meta.generation}.faiss"), data.tobytes(), self.storage
        )
        buffer = pa.BufferOutputStream()
        pq.write_table(built.rows, buffer)
        rows_uri = _rows_uri(self.index_uri, meta.generation)
        storage.write_bytes(rows_uri, buffer.getvalue().to_pybytes(), self.storage)
        storage.write_bytes(storage.join(self.index_uri, META_FILE), meta.to_json(), self.storage)
        if previous and previous != meta.generation:
            storage.delete(storage.join(self.index_uri, f"vectors-{previous}.faiss"), self.storage)
            storage.delete(_rows_uri(self.index_uri, previous), self.storage)

    # -- internals ---------------------------------------------------------------------------------------

    def _dim(self, files: list[str]) -> int:
        for batch in vectors.read_batches(files[:1], ("embedding",), self.storage, batch_rows=1):
            return batch.column(0).type.list_size
        raise BitrayError(f"{files[0]!r} holds no rows")

    def _empty(self, meta: IndexMeta, files: list[str], newest: dict[str, str], count: int):  # noqa: ANN202

        if meta.kind == "flat":
            return exact_index(meta.dim)
        nlist = ivf_cells(count)
        sample = self._training_sample(files, newest, count, training_size(count))
        meta.nlist = nlist
        meta.nprobe = self.options.nprobe or default_nprobe(nlist)
        meta.trained_on = count
        return trained_ivf(sample, nlist)

    def _training_sample(self, files: list[str], newest: dict[str, str], count: int, size: int) -> np.ndarray:
        """``size`` live vectors drawn uniformly (seeded), collected in one streaming pass."""
        rng = np.random.default_rng(self.options.seed)
        chosen = np.sort(rng.choice(count, size=size, replace=False))
        parts, seen = [], 0
        for batch in vectors.read_batches(files, ("path", "run_id", "embedding"), self.storage):
            live = batch.filter(pa.array(vectors.live_mask(batch, newest)))
            lo, hi = np.searchsorted(chosen, [seen, seen + live.num_rows])
            if hi > lo:
                take = pa.array(chosen[lo:hi] - seen)
                parts.append(vectors.to_vectors(live.column("embedding").take(take)))
            seen += live.num_rows
        return np.concatenate(parts)

    def _add(self, index, meta: IndexMeta, files: list[str], newest: dict[str, str]) -> pa.Table:  # noqa: ANN001
        """Stream the live rows of ``files`` into ``index`` with ids from ``meta.next_id``; their rows."""
        columns = (*vectors.ROW_COLUMNS, "embedding")
        tables = []
        for batch in vectors.read_batches(files, columns, self.storage):
            live = batch.filter(pa.array(vectors.live_mask(batch, newest)))
            if live.num_rows == 0:
                continue
            self._check_model(live, files)
            vecs = vectors.to_vectors(live.column("embedding"))
            if vecs.shape[1] != meta.dim:
                raise BitrayError(
                    f"{self.embeddings!r} holds {vecs.shape[1]}-d vectors beside {meta.dim}-d ones; "
                    "an index holds one model's vectors"
                )
            ids = np.arange(meta.next_id, meta.next_id + live.num_rows, dtype=np.int64)
            index.add_with_ids(vecs, ids)
            meta.next_id += live.num_rows
            tables.append(_rows_of(live, ids))
        return pa.concat_tables(tables) if tables else ROWS_SCHEMA.empty_table()

    def _check_model(self, batch: pa.RecordBatch, files: list[str]) -> None:
        models = set(batch.column("model").unique().to_pylist())
        if self.model_id is not None:
            models.add(self.model_id)
        if len(models) > 1:
            raise BitrayError(
                f"{self.embeddings!r} holds vectors of models {sorted(models)}; an index holds one model's "
                "vectors: embed each model into its own output"
            )
        self.model_id = models.pop()


def exact_index(dim: int):  # noqa: ANN201 - a faiss index
    """Exact inner-product search over vectors added with our own int64 ids."""
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def ivf_cells(count: int) -> int:
    """IVF cells for ``count`` vectors: 2 sqrt(n), about 900 for 200k."""
    return max(1, min(count, int(2 * math.sqrt(count))))


def training_size(count: int) -> int:
    return min(count, TRAIN_PER_CELL * ivf_cells(count))


def default_nprobe(nlist: int) -> int:
    """Cells a query scans: 15% of them (at least 16), where recall@10 reached 0.95 on the benchmark's
    overlapping clusters (``bench/search_bench.py``: 0.94 at 6%, 0.97 at 29%)."""
    return max(16, round(0.15 * nlist))


def trained_ivf(sample: np.ndarray, nlist: int):  # noqa: ANN201 - a faiss index
    """An IVF-Flat inner-product index with ``nlist`` cells trained (k-means) on ``sample``; ids are ours."""
    import faiss

    dim = sample.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct and remove by our ids
    log.info("training %d IVF cells on %d vectors", nlist, len(sample))
    index.train(sample)
    return index


def _rows_of(batch: pa.RecordBatch, ids: np.ndarray) -> pa.Table:
    columns = {"id": pa.array(ids, pa.int64())}
    for name in ROWS_SCHEMA.names[1:]:
        columns[name] = batch.column(name).cast(ROWS_SCHEMA.field(name).type)
    return pa.table(columns, schema=ROWS_SCHEMA)


def _rows_uri(index_uri: str, generation: str) -> str:
    return storage.join(index_uri, f"rows-{generation}.parquet")


def _absolute(uri: str) -> str:
    uri = uri.rstrip("/")
    return uri if storage.is_remote(uri) else str(storage.local_path(uri))
