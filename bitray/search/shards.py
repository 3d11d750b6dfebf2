"""Build and update a compressed, sharded index on Ray (kind ``ivfpq``; parameters: ``bitray.search.params``).

**Build.** The driver counts rows from the Parquet footers, trains the quantiser (PCA rotation, IVF
cells, PQ codebooks) on a bounded sample read from randomly chosen files (``params.TRAIN_MAX`` vectors,
whatever the count), and stores it empty as ``trained-<key>.faiss``. The runs' files are cut into groups of
``files_per_shard`` (never across runs); one Ray task per group reads its files a row-group batch at a time,
encodes and adds them to a copy of the trained index with ids ``(shard number << 32) | row``, and writes
``shards/<name>.faiss``, ``shards/<name>.rows.parquet`` (id, path, object version, file, row) and last
``shards/<name>.json``, its commit record. No process holds more than the sample, one batch and one
shard's codes. Names are deterministic (run, file names, quantiser), so a rerun after a kill at any point
skips the committed shards and rebuilds a half-written one from scratch: no vector is added twice.

**Commit.** Superseded versions (a path embedded again by a later run) and paths a later incremental
embedding run found deleted (``bitray.outputs.deleted_paths``) are *masked*
(``masked-<generation>.npy``, ids filtered at search time by a faiss ``IDSelector``), then ``index.json``
is written by compare-and-swap (``bitray.search.commit``): of two concurrent updates one wins; the other
deletes the files only it wrote and fails with a message.

**Update.** New finished runs become new shards encoded with the existing quantiser (no retraining), and
the paths they embed again are masked in older shards. Retraining (a full rebuild) happens when the
vectors grew past ``RETRAIN_GROWTH`` x those the quantiser was trained for, or when the new vectors'
reconstruction error exceeds ``RETRAIN_ERROR`` x the training sample's (the quantiser no longer fits).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import resource
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bitray import storage, testhooks
from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.search import vectors
from bitray.search.commit import CommitConflict, commit_meta
from bitray.search.params import IndexParams

log = logging.getLogger(__name__)

FILES_PER_SHARD = 16
"""About 131k vectors per shard at 8,192 rows per file: 18 MB of codes at 136 bytes each."""
RETRAIN_GROWTH = 4
KEPT_VARIANCE_WARNING = 0.8
RETRAIN_ERROR = 1.5
ERROR_SAMPLE = 1024
SHARD_ROWS_SCHEMA = vectors.ROWS_SCHEMA.append(pa.field("file", pa.string())).append(
    pa.field("row", pa.int32())
)
"""A shard's rows: the index's, plus where each vector's full-precision copy is (for re-ranking)."""
ROWS_GROUP = 4096
"""Rows per row group of a shard's rows file: a query reads the groups of its results only."""


@dataclass
class ShardJob:
    number: int
    run: str
    files: list[str]
    name: str


def shard_uri(index_uri: str, name: str, suffix: str) -> str:
    return storage.join(index_uri, "shards", f"{name}{suffix}")


def plan_shards(
    files_by_run: dict[str, list[str]], template: str, first_number: int, files_per_shard: int
) -> list[ShardJob]:
    """Groups of ``files_per_shard`` files of one run each, numbered from ``first_number``, named by their
    run, their files and the quantiser (so a rerun finds the same names)."""
    jobs, number = [], first_number
    for run, files in files_by_run.items():
        for start in range(0, len(files), files_per_shard):
            group = sorted(files)[start : start + files_per_shard]
            digest = hashlib.sha1("\n".join([template, *(f.rsplit("/", 1)[-1] for f in group)]).encode())
            jobs.append(ShardJob(number, run, group, f"shard-{run}-{digest.hexdigest()[:16]}"))
            number += 1
    return jobs


def train_template(
    index_uri: str,
    files: list[str],
    params: IndexParams,
    key: str,
    seed: int,
    storage_config: StorageConfig | None,
) -> tuple[str, float]:
    """Train (or find, after a kill) the empty quantiser ``trained-<key>.faiss``; its name and the mean
    squared reconstruction error on its sample."""
    import faiss

    name = f"trained-{key}.faiss"
    uri = storage.join(index_uri, name)
    sample = _sample(files, params.train_size, seed, storage_config)
    held = storage.read_if_exists(uri, storage_config)
    if held is not None:
        index = faiss.deserialize_index(np.frombuffer(held, np.uint8))
    else:
        index = faiss.index_factory(sample.shape[1], params.factory, faiss.METRIC_L2)
        # polysemous training (Hamming-filtered search, which we do not use) is most of a PQ's training time
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
        log.info("training %s on %d vectors", params.factory, len(sample))
        index.train(sample)
        storage.write_bytes(uri, faiss.serialize_index(index).tobytes(), storage_config)
    kept = kept_variance(index)
    if kept < KEPT_VARIANCE_WARNING:
        log.warning(
            "PCA to %d dims keeps %.0f%% of these vectors' variance: the compressed index will miss "
            "many neighbours (isotropic bench vectors: recall@10 0.16). Give --max-index-memory room for "
            "IVF-Flat, or check that the vectors are embeddings",
            params.reduced,
            100 * kept,
        )
    return name, reconstruction_error(index, sample[:ERROR_SAMPLE])


def kept_variance(index) -> float:  # noqa: ANN001 - a faiss IndexPreTransform with a PCA first
    """Share of the training sample's variance the PCA keeps (realistic bench vectors: 0.95 at 256 dims)."""
    import faiss

    pca = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
    eigen = faiss.vector_to_array(pca.eigenvalues)
    return float(eigen[: pca.d_out].sum() / max(eigen.sum(), 1e-12))


def reconstruction_error(index, sample: np.ndarray) -> float:  # noqa: ANN001 - a faiss index
    """Mean squared distance of unit vectors to their decoded codes: how well the quantiser fits them."""
    if len(sample) == 0:
        return 0.0
    decoded = index.sa_decode(index.sa_encode(sample))
    return float(np.mean(np.sum((sample - decoded) ** 2, axis=1)))


def committed_record(index_uri: str, name: str, storage_config: StorageConfig | None) -> dict | None:
    """The record of shard ``name`` when an earlier attempt committed it (a resumed build skips it)."""
    held = storage.read_if_exists(shard_uri(index_uri, name, ".json"), storage_config)
    return json.loads(held) if held is not None else None


def trained_template(index_uri: str, template: str, storage_config: StorageConfig | None):  # noqa: ANN201
    """A fresh copy of the index's trained, empty faiss template, to add a shard's vectors to."""
    import faiss

    data = storage.read_bytes(storage.join(index_uri, template), storage_config)
    return faiss.deserialize_index(np.frombuffer(data, np.uint8))


def build_shard(index_uri: str, template: str, job: ShardJob, storage_config: StorageConfig | None) -> dict:
    """Encode one file group into its shard (a Ray task's body); its record, also when committed before."""
    import faiss

    held = committed_record(index_uri, job.name, storage_config)
    if held is not None:
        return held
    started = time.monotonic()
    index = trained_template(index_uri, template, storage_config)
    base = job.number << 32
    tables, models, local, sample = [], set(), 0, []
    columns = (*vectors.ROW_COLUMNS, "embedding")
    for uri in job.files:
        row = 0
        for batch in vectors.read_batches([uri], columns, storage_config):
            vecs = vectors.to_vectors(batch.column("embedding"))
            ids = np.arange(base + local, base + local + len(vecs), dtype=np.int64)
            index.add_with_ids(vecs, ids)
            if sum(map(len, sample)) < ERROR_SAMPLE:
                sample.append(vecs[:ERROR_SAMPLE])
            models.update(batch.column("model").unique().to_pylist())
            tables.append(_rows_of(batch, ids, uri, row))
            local += len(vecs)
            row += len(vecs)
    if job.number == 1:
        testhooks.exit_once(testhooks.SHARD_CRASH)
    rows = pa.concat_tables(tables) if tables else SHARD_ROWS_SCHEMA.empty_table()
    buffer = pa.BufferOutputStream()
    pq.write_table(rows, buffer, row_group_size=ROWS_GROUP)
    storage.write_bytes(
        shard_uri(index_uri, job.name, ".rows.parquet"), buffer.getvalue().to_pybytes(), storage_config
    )
    storage.write_bytes(
        shard_uri(index_uri, job.name, ".faiss"), faiss.serialize_index(index).tobytes(), storage_config
    )
    error = reconstruction_error(index, np.concatenate(sample)[:ERROR_SAMPLE]) if sample else 0.0
    record = {
        "name": job.name,
        "number": job.number,
        "run": job.run,
        "files": job.files,
        "count": local,
        "models": sorted(models),
        "error": round(error, 6),
        "seconds": round(time.monotonic() - started, 3),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,  # this worker's, so far
    }
    storage.write_bytes(shard_uri(index_uri, job.name, ".json"), json.dumps(record).encode(), storage_config)
    return record


def build_shards(
    index_uri: str,
    template: str,
    jobs: list[ShardJob],
    storage_config: StorageConfig | None,
    address: str | None = None,
) -> list[dict]:
    """Run ``build_shard`` for every job as Ray tasks (one CPU each, retried if a worker dies)."""
    import ray

    from bitray.ray_session import connect

    connect(address)
    env = testhooks.forwarded()
    task = ray.remote(build_shard).options(
        num_cpus=1, max_retries=3, runtime_env={"env_vars": env} if env else None
    )
    pending = [task.remote(index_uri, template, job, storage_config) for job in jobs]
    kill_after = int(testhooks.value(testhooks.INDEX_KILL_AFTER) or 0)
    if kill_after:  # tests: the driver dies (SIGKILL) once that many shards are committed
        done: list = []
        while len(done) < kill_after:
            ready, _ = ray.wait([p for p in pending if p not in done], num_returns=1)
            done += ready
        testhooks.kill_self()
    return ray.get(pending)


def masked_ids(
    index_uri: str,
    shards: list[dict],
    runs: list[str],
    fresh: set[int],
    remember_oldest: bool,
    deleted: dict[str, set[str]],
    storage_config: StorageConfig | None,
) -> np.ndarray:
    """Ids of superseded versions (their path is in a later run's shard) and of paths a later run found
    deleted (``deleted``: run -> paths, ``bitray.outputs.deleted_paths``).

    Runs are walked newest first; the paths of ``fresh`` shards are remembered (all but the oldest run's
    when ``remember_oldest`` is false: nothing older can be superseded by them), and a run's deletions once
    its own shards are passed, so memory holds the paths of the new runs and their deletions only. Older
    shards are read (id and path columns) only when there is something to mask.
    """
    rank = {run: i for i, run in enumerate(runs)}
    oldest = runs[0] if runs else None
    pending = sorted((run for run in deleted if run in rank), key=lambda run: -rank[run])
    seen: set[str] = set()
    out = []
    for record in sorted(shards, key=lambda r: (-rank.get(r["run"], -1), -r["number"])):
        while pending and rank[pending[0]] > rank.get(record["run"], -1):
            seen |= deleted[pending.pop(0)]
        if not seen and record["number"] not in fresh:
            continue
        table = pq.read_table(
            io.BytesIO(
                storage.read_bytes(shard_uri(index_uri, record["name"], ".rows.parquet"), storage_config)
            ),
            columns=["id", "path"],
        )
        if seen:
            hit = pc.is_in(table.column("path"), value_set=pa.array(list(seen), pa.string()))
            out.append(table.filter(hit).column("id").to_numpy())
        if record["number"] in fresh and (remember_oldest or record["run"] != oldest):
            seen.update(table.column("path").to_pylist())
    return np.unique(np.concatenate(out)) if out else np.empty(0, np.int64)


def write_masked(
    index_uri: str, generation: str, ids: np.ndarray, storage_config: StorageConfig | None
) -> str:
    name = f"masked-{generation}.npy"
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(ids, np.int64))
    storage.write_bytes(storage.join(index_uri, name), buffer.getvalue(), storage_config)
    return name


def new_generation() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def commit(
    index_uri: str,
    meta_json: bytes,
    previous_generation: str | None,
    written: list[str],
    storage_config: StorageConfig | None,
) -> None:
    """Compare-and-swap ``index.json``; on a conflict delete ``written`` (files only this update made that
    the winner does not name) and re-raise."""
    try:
        commit_meta(storage.join(index_uri, "index.json"), meta_json, previous_generation, storage_config)
    except CommitConflict:
        winner = storage.read_if_exists(storage.join(index_uri, "index.json"), storage_config) or b""
        for uri in written:
            if uri.rsplit("/", 1)[-1].split(".")[0] not in winner.decode():
                storage.delete(uri, storage_config)
        raise


def shard_files(index_uri: str, name: str) -> list[str]:
    return [shard_uri(index_uri, name, s) for s in (".json", ".faiss", ".rows.parquet")]


def _sample(files: list[str], size: int, seed: int, storage_config: StorageConfig | None) -> np.ndarray:
    """``size`` vectors from randomly chosen whole files (seeded): reads about ``size`` rows, not all."""
    rng = np.random.default_rng(seed)
    parts, held = [], 0
    for i in rng.permutation(len(files)):
        for batch in vectors.read_batches([files[i]], ("embedding",), storage_config):
            parts.append(vectors.to_vectors(batch.column(0)))
            held += len(parts[-1])
        if held >= size:
            break
    if not parts:
        raise BitrayError(f"{files[:1]!r}: no rows to train the index on")
    sample = np.concatenate(parts)
    return sample[np.sort(rng.choice(len(sample), min(size, len(sample)), replace=False))]


def _rows_of(batch: pa.RecordBatch, ids: np.ndarray, uri: str, first_row: int) -> pa.Table:
    columns = {"id": pa.array(ids, pa.int64())}
    for name in SHARD_ROWS_SCHEMA.names[1:8]:
        columns[name] = batch.column(name).cast(SHARD_ROWS_SCHEMA.field(name).type)
    columns["file"] = pa.array([uri] * len(ids), pa.string())
    columns["row"] = pa.array(np.arange(first_row, first_row + len(ids)), pa.int32())
    return pa.table(columns, schema=SHARD_ROWS_SCHEMA)
