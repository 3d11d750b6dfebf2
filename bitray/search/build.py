"""One update of a sharded index (``bitray.search.shards``): decide retraining, build the new shards on
Ray, mask superseded vectors and those of objects the embedding runs found deleted, merge small shards
(``bitray.search.merge``), commit, then delete what the new generation no longer names.

Works on the plain dict of ``index.json`` so that it needs nothing from ``bitray.search.index``.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from bitray import outputs, storage
from bitray.config import StorageConfig
from bitray.search import merge, shards, vectors
from bitray.search.commit import CommitConflict
from bitray.search.params import IndexParams

log = logging.getLogger(__name__)


def update_sharded(
    embeddings: str,
    index_uri: str,
    existing: dict | None,
    runs: list[str],
    new_runs: list[str],
    params: IndexParams,
    *,
    seed: int = 0,
    files_per_shard: int = shards.FILES_PER_SHARD,
    address: str | None = None,
    storage_config: StorageConfig | None = None,
    base: dict | None = None,
) -> tuple[dict, int, int, bool]:
    """The committed ``index.json`` dict, vectors added, vectors masked, and whether it retrained.

    ``existing`` is the current meta (None for a new index, or one of another kind, which is replaced);
    ``base`` the fields a new meta starts from (embeddings, model, image size, dim)."""
    sharded = existing is not None and existing.get("kind") == "ivfpq"
    retrain = not sharded or _needs_retrain(embeddings, index_uri, existing, new_runs, storage_config)
    build_runs = runs if retrain else new_runs
    files_by_run = {
        run: outputs.committed_files(embeddings, "embeddings", storage_config, [run]) for run in build_runs
    }
    all_files = [f for files in files_by_run.values() for f in files]
    if retrain:
        key = hashlib.sha1(json.dumps([params.factory, runs, seed]).encode()).hexdigest()[:12]
        template, error = shards.train_template(index_uri, all_files, params, key, seed, storage_config)
        first, kept, old_masked = 0, [], np.empty(0, np.int64)
    else:
        template, error = existing["template"], existing["train_error"]
        first, kept = existing["next_id"], list(existing["shards"])
        old_masked = _load_masked(index_uri, existing, storage_config)
    jobs = shards.plan_shards(files_by_run, template, first, files_per_shard)
    records = shards.build_shards(index_uri, template, jobs, storage_config, address) if jobs else []
    models = {m for r in records for m in r["models"]} | ({existing["model_id"]} if sharded else set())
    if len(models) > 1:
        from bitray.errors import BitrayError

        raise BitrayError(
            f"{embeddings!r} holds vectors of models {sorted(models)}; an index holds one model's vectors: "
            "embed each model into its own output"
        )
    fresh = {r["number"] for r in records}
    deleted = deletions(embeddings, build_runs, storage_config)
    masked = shards.masked_ids(
        index_uri,
        kept + records,
        runs,
        fresh,
        remember_oldest=not retrain,
        deleted=deleted,
        storage_config=storage_config,
    )
    masked = np.union1d(old_masked, masked)
    masked_before = len(masked)
    shard_list, next_number = kept + records, first + len(jobs)
    merged = []
    for group in merge.plan_merges(shard_list, masked):
        merged.append(merge.merge_shards(index_uri, template, group, next_number, masked, storage_config))
        next_number += 1
    if merged:
        gone = {name for m in merged for name in m["merged_from"]}
        shard_list = [r for r in shard_list if r["name"] not in gone] + merged
        masked = masked[np.isin(masked >> 32, [r["number"] for r in shard_list])]
        log.info("merged %d small shards into %d", len(gone), len(merged))
    generation = shards.new_generation()
    masked_name = shards.write_masked(index_uri, generation, masked, storage_config)
    total = sum(r["count"] for r in shard_list)
    meta = dict(base or {}) if retrain or not sharded else dict(existing)
    meta.update(
        kind="ivfpq",
        runs=list(runs),
        count=int(total - len(masked)),
        next_id=next_number,
        generation=generation,
        nlist=params.nlist if retrain else existing["nlist"],
        nprobe=params.nprobe if retrain else existing["nprobe"],
        trained_on=(total if retrain else existing["trained_on"]),
        factory=params.factory if retrain else existing["factory"],
        template=template,
        train_error=round(error, 6),
        shards=[{k: r[k] for k in ("name", "number", "run", "count", "error")} for r in shard_list],
        masked=masked_name,
        previous_masked=existing.get("masked") if sharded else None,
        model_id=models.pop() if models else meta.get("model_id", ""),
    )
    meta["updated"] = generation
    written = [storage.join(index_uri, masked_name)]
    for record in records + merged:
        written += shards.shard_files(index_uri, record["name"])
    if retrain:
        written.append(storage.join(index_uri, template))
    data = json.dumps(meta, indent=2).encode()
    shards.commit(index_uri, data, existing["generation"] if existing else None, written, storage_config)
    _drop_previous(index_uri, existing, meta, storage_config)
    for record in records:  # built by this update and merged in it: no generation names them
        if any(record["name"] in m["merged_from"] for m in merged):
            for uri in shards.shard_files(index_uri, record["name"]):
                storage.delete(uri, storage_config)
    added = sum(r["count"] for r in records)
    replaced = int(masked_before - len(old_masked)) if not retrain else int(masked_before)
    return meta, added, replaced, retrain


def deletions(embeddings: str, runs: list[str], storage_config: StorageConfig | None) -> dict[str, set[str]]:
    """Run -> the paths it found deleted, for the ``runs`` that found any (memory: those paths)."""
    found = {run: set(outputs.deleted_paths(embeddings, run, storage_config)) for run in runs}
    return {run: paths for run, paths in found.items() if paths}


def _needs_retrain(
    embeddings: str, index_uri: str, existing: dict, new_runs: list[str], storage_config: StorageConfig | None
) -> bool:
    """Grown past ``RETRAIN_GROWTH`` x the trained count, or the new vectors' reconstruction error is
    above ``RETRAIN_ERROR`` x the training sample's."""
    import faiss

    files = outputs.committed_files(embeddings, "embeddings", storage_config, new_runs)
    if (
        existing["count"] + vectors.count_rows(files, storage_config)
        > shards.RETRAIN_GROWTH * existing["trained_on"]
    ):
        log.info("index %s grew past %dx its training: retraining", index_uri, shards.RETRAIN_GROWTH)
        return True
    if not files:
        return False
    template = faiss.deserialize_index(
        np.frombuffer(
            storage.read_bytes(storage.join(index_uri, existing["template"]), storage_config), np.uint8
        )
    )
    sample = shards._sample(files, shards.ERROR_SAMPLE, 0, storage_config)
    error = shards.reconstruction_error(template, sample)
    if error > shards.RETRAIN_ERROR * max(existing["train_error"], 1e-9):
        log.info(
            "new vectors fit the quantiser badly (error %.4f vs %.4f): retraining",
            error,
            existing["train_error"],
        )
        return True
    return False


def _load_masked(index_uri: str, meta: dict, storage_config: StorageConfig | None) -> np.ndarray:
    import io

    if not meta.get("masked"):
        return np.empty(0, np.int64)
    data = storage.read_if_exists(storage.join(index_uri, meta["masked"]), storage_config)
    if data is None:
        raise CommitConflict(
            f"{index_uri} moved on two generations while this update began; run bitray index again"
        )
    return np.load(io.BytesIO(data))


def _drop_previous(index_uri: str, old: dict | None, new: dict, storage_config: StorageConfig | None) -> None:
    """Delete the previous generation's files that the new one does not name."""
    if old is None:
        return
    if old.get("kind") != "ivfpq":
        for name in (f"vectors-{old['generation']}.faiss", f"rows-{old['generation']}.parquet"):
            storage.delete(storage.join(index_uri, name), storage_config)
        return
    keep = {s["name"] for s in new["shards"]}
    for shard in old["shards"]:
        if shard["name"] not in keep:
            for uri in shards.shard_files(index_uri, shard["name"]):
                storage.delete(uri, storage_config)
    # the previous mask stays one more generation: a reader or an update that began from it can finish
    for name in (old.get("previous_masked"), old.get("template")):
        if name and name not in (new.get("masked"), new.get("previous_masked"), new.get("template")):
            storage.delete(storage.join(index_uri, name), storage_config)
