"""Merging the small shards that incremental updates leave behind (``bitray.search.build`` calls it).

**Policy.** Every update adds at least one shard per new run, so a scheduled embedding leaves many small
ones, and each costs a file, a mapping and an inverted-list scan per query. A shard is *small* when its live
vectors (count less masked) are under ``SMALL_SHARE`` of the largest shard's; once ``MERGE_AT`` or more are
small, they are merged in number order into shards of at most the largest one's live vectors (a group of
one is left as it is). Masked vectors are dropped on the way, and with them their entries of the mask.

**How.** faiss's inverted lists are copied code by code (no re-encoding, no retraining: every shard shares
the quantiser) into an empty copy of the trained index, skipping masked ids and renumbering the rest
``(new number << 32) | row`` in the merged rows file's order. Memory: one merged shard. A merged shard is
written like a built one (rows, codes, then its ``.json`` record last) under a name made from its sources
and number, so an update killed after it is resumed with it reused; it enters ``index.json`` with the rest
of the update, by the same compare-and-swap, and its sources' files are deleted only after that commit.
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bitray import storage
from bitray.config import StorageConfig
from bitray.search import shards

SMALL_SHARE = 0.5
MERGE_AT = 4


def plan_merges(records: list[dict], masked: np.ndarray) -> list[list[dict]]:
    """Groups of small shards to merge (each of two or more), in shard number order; none when fewer than
    ``MERGE_AT`` shards are small."""
    if not records:
        return []
    numbers, dead = np.unique(np.asarray(masked, np.int64) >> 32, return_counts=True)
    dead_of = dict(zip(numbers.tolist(), dead.tolist(), strict=True))
    live = {r["number"]: r["count"] - dead_of.get(r["number"], 0) for r in records}
    target = max(live.values())
    small = [
        r for r in sorted(records, key=lambda r: r["number"]) if live[r["number"]] < SMALL_SHARE * target
    ]
    if len(small) < MERGE_AT:
        return []
    groups, group, held = [], [], 0
    for record in small:
        if group and held + live[record["number"]] > target:
            groups.append(group)
            group, held = [], 0
        group.append(record)
        held += live[record["number"]]
    groups.append(group)
    return [g for g in groups if len(g) > 1]


def merge_shards(
    index_uri: str,
    template: str,
    group: list[dict],
    number: int,
    masked: np.ndarray,
    storage_config: StorageConfig | None,
) -> dict:
    """Merge ``group``'s live vectors into shard ``number``; its record (also when written before)."""
    import faiss

    digest = hashlib.sha1("\n".join([template, str(number), *(r["name"] for r in group)]).encode())
    name = f"merged-{number:06d}-{digest.hexdigest()[:16]}"
    held = shards.committed_record(index_uri, name, storage_config)
    if held is not None:
        return held
    started = time.monotonic()
    merged = shards.trained_template(index_uri, template, storage_config)
    target = faiss.extract_index_ivf(merged)
    base, tables, errors = number << 32, [], []
    for record in sorted(group, key=lambda r: r["number"]):
        rows = pq.read_table(
            io.BytesIO(
                storage.read_bytes(
                    shards.shard_uri(index_uri, record["name"], ".rows.parquet"), storage_config
                )
            )
        )
        rows = rows.filter(pa.array(~np.isin(rows.column("id").to_numpy(), masked)))
        old_ids = rows.column("id").to_numpy()  # ascending: a shard's rows are in id order
        first = base + sum(t.num_rows for t in tables)
        new_ids = np.arange(first, first + len(old_ids), dtype=np.int64)
        tables.append(rows.set_column(0, "id", pa.array(new_ids, pa.int64())))
        if len(old_ids) == 0:
            continue
        local = storage.copy_to_local(shards.shard_uri(index_uri, record["name"], ".faiss"), storage_config)
        shard = faiss.read_index(str(local), faiss.IO_FLAG_MMAP)  # owns the IVF below: keep it alive
        _copy_lists(faiss.extract_index_ivf(shard), target, old_ids, new_ids)
        del shard
        errors.append((record.get("error", 0.0), len(old_ids)))
    merged.ntotal = target.ntotal
    table = pa.concat_tables(tables)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, row_group_size=shards.ROWS_GROUP)
    storage.write_bytes(
        shards.shard_uri(index_uri, name, ".rows.parquet"), buffer.getvalue().to_pybytes(), storage_config
    )
    storage.write_bytes(
        shards.shard_uri(index_uri, name, ".faiss"), faiss.serialize_index(merged).tobytes(), storage_config
    )
    weight = sum(n for _, n in errors)
    record = {
        "name": name,
        "number": number,
        "run": group[-1]["run"],  # the newest of its sources': later runs still supersede all of it
        "count": table.num_rows,
        "error": round(sum(e * n for e, n in errors) / max(weight, 1), 6),
        "merged_from": [r["name"] for r in group],
        "seconds": round(time.monotonic() - started, 3),
    }
    storage.write_bytes(
        shards.shard_uri(index_uri, name, ".json"), json.dumps(record).encode(), storage_config
    )
    return record


def _copy_lists(source, target, old_ids: np.ndarray, new_ids: np.ndarray) -> None:  # noqa: ANN001 - faiss IVF
    """Append ``source``'s codes of ``old_ids`` to ``target``'s lists as ``new_ids`` (others skipped)."""
    import faiss

    code_size = source.code_size
    lists = source.invlists
    for cell in range(source.nlist):
        n = lists.list_size(cell)
        if n == 0:
            continue
        ids = faiss.rev_swig_ptr(lists.get_ids(cell), n).copy()
        codes = faiss.rev_swig_ptr(lists.get_codes(cell), n * code_size).reshape(n, code_size)
        where = np.searchsorted(old_ids, ids)
        keep = (where < len(old_ids)) & (old_ids[np.minimum(where, len(old_ids) - 1)] == ids)
        if not keep.any():
            continue
        moved = np.ascontiguousarray(new_ids[where[keep]])
        kept = np.ascontiguousarray(codes[keep])
        target.invlists.add_entries(cell, len(moved), faiss.swig_ptr(moved), faiss.swig_ptr(kept))
        target.ntotal += len(moved)
