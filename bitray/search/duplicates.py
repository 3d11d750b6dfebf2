"""Near-duplicate groups of an index: images whose cosine similarity reaches a threshold, and exact copies.

Every stored vector is a query of a faiss range search (``similarity >= threshold``; on an IVF index
only the ``nprobe`` nearest cells are searched, so a pair split across far cells can be missed). Pairs
found are joined into groups (connected components, by union-find), so a chain a~b~c makes one group
even when a and c are further apart: each member's ``similarity`` to the group's representative says how
close it really is. The representative is the member with the most pairs in its group (ties: the first
path in sort order).

A member is an ``exact`` duplicate of its representative when their bytes are the same: equal ETags (S3
ETags of single-part uploads are MD5s of the content), else equal size and equal SHA-256 of the content,
read from storage for group members only, and only under the output's recorded inputs (``IndexReads``).
(The ``etag`` column of a ``gs://`` object holds its generation, which says nothing about the content.)

Output columns: ``group`` (0 = largest group), ``path``, ``similarity`` (to the representative; 1 for
itself), ``representative``, ``exact``, ``group_size``, ``etag``, ``size``. Groups of one are not written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bitray import storage
from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.search.index import SearchIndex
from bitray.search.scope import IndexReads
from bitray.search.sheet import SheetItem

QUERY_BATCH = 1024
SCHEMA = pa.schema(
    [
        ("group", pa.int32()),
        ("path", pa.string()),
        ("similarity", pa.float32()),
        ("representative", pa.bool_()),
        ("exact", pa.bool_()),
        ("group_size", pa.int32()),
        ("etag", pa.string()),
        ("size", pa.int64()),
    ]
)


@dataclass(frozen=True)
class DuplicateOptions:
    threshold: float = 0.95
    nprobe: int | None = None


def find_duplicates(
    index: SearchIndex, options: DuplicateOptions | None = None, storage_config: StorageConfig | None = None
) -> pa.Table:
    """Groups of near-identical images in ``index`` as a table (see the module doc), largest group first."""
    options = options or DuplicateOptions()
    if not -1.0 <= options.threshold <= 1.0:
        raise BitrayError(f"--threshold {options.threshold}: a cosine similarity lies between -1 and 1")
    if getattr(index, "sharded", False):  # compressed: candidates from the index, confirmed exactly
        from bitray.search.candidates import candidate_index

        index = candidate_index(index, options.threshold, options.nprobe)
    ids = index.rows.column("id").to_numpy()
    pairs = _pairs(index, ids, options)
    groups = _components(pairs)
    if not groups:
        return SCHEMA.empty_table()
    paths = index.rows.column("path").to_pylist()
    etags = index.rows.column("etag").to_pylist()
    sizes = index.rows.column("size").to_pylist()
    degree = np.zeros(len(ids), np.int64)
    for a, b in pairs:
        degree[a] += 1
        degree[b] += 1
    out: dict[str, list] = {name: [] for name in SCHEMA.names}
    hashes = _Hashes(index, storage_config)
    for group, members in enumerate(sorted(groups, key=lambda m: (-len(m), min(paths[i] for i in m)))):
        rep = min(members, key=lambda i: (-degree[i], paths[i]))
        vecs = index.vectors_of(ids[members])
        sims = vecs @ vecs[members.index(rep)]
        order = sorted(range(len(members)), key=lambda n: (members[n] != rep, -sims[n], paths[members[n]]))
        for n in order:
            i = members[n]
            out["group"].append(group)
            out["path"].append(paths[i])
            out["similarity"].append(1.0 if i == rep else float(sims[n]))
            out["representative"].append(i == rep)
            out["exact"].append(i == rep or _same_bytes(i, rep, paths, etags, sizes, hashes))
            out["group_size"].append(len(members))
            out["etag"].append(etags[i])
            out["size"].append(sizes[i])
    return pa.table(out, schema=SCHEMA)


def write_duplicates(table: pa.Table, uri: str, storage_config: StorageConfig | None = None) -> None:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue().to_pybytes(), storage_config)


def sheet_items(table: pa.Table, groups: int = 6, per_group: int = 6) -> list[SheetItem]:
    """Tiles of the ``groups`` largest groups, at most ``per_group`` members each, group after group."""
    items: list[SheetItem] = []
    rows = table.to_pylist()
    for group in range(min(groups, len(set(table.column("group").to_pylist())))):
        members = [r for r in rows if r["group"] == group][:per_group]
        for r in members:
            kind = "rep" if r["representative"] else ("exact" if r["exact"] else f"{r['similarity']:.3f}")
            items.append(SheetItem(r["path"], f"group {group} · {kind}", highlight=r["representative"]))
    return items


def _pairs(index: SearchIndex, ids: np.ndarray, options: DuplicateOptions) -> list[tuple[int, int]]:
    """Row positions (in ``index.rows``) of every pair at or above the threshold, each pair once."""
    position = {int(v): i for i, v in enumerate(ids)}
    if index.meta.kind == "ivf":
        index.index.nprobe = int(options.nprobe or index.meta.nprobe or 16)
    radius = np.float32(options.threshold) - np.float32(1e-6)  # faiss keeps strictly greater: include equal
    found: set[tuple[int, int]] = set()
    for start in range(0, len(ids), QUERY_BATCH):
        batch = ids[start : start + QUERY_BATCH]
        lims, _, labels = index.index.range_search(index.vectors_of(batch), float(radius))
        for q, query_id in enumerate(batch):
            a = position[int(query_id)]
            for other in labels[lims[q] : lims[q + 1]]:
                b = position[int(other)]
                if a != b:
                    found.add((min(a, b), max(a, b)))
    return sorted(found)


def _components(pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components (of two or more positions) of the graph the pairs are the edges of."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for x in list(parent):
        groups.setdefault(root(x), []).append(x)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def _same_bytes(
    i: int, rep: int, paths: list[str], etags: list[str | None], sizes: list[int], hashes: _Hashes
) -> bool:
    s3 = storage.scheme_of(paths[i]) == storage.scheme_of(paths[rep]) == "s3"  # a GCS "etag" is a generation
    if s3 and etags[i] and etags[rep] and etags[i] == etags[rep]:
        return True
    if sizes[i] != sizes[rep]:
        return False
    return hashes.digest(paths[i]) == hashes.digest(paths[rep]) is not None


class _Hashes:
    """SHA-256 of group members, each read once, only under the output's inputs and up to its
    ``max_bytes`` (``IndexReads``: the paths come from the index file)."""

    def __init__(self, index: SearchIndex, storage_config: StorageConfig | None) -> None:
        self.index = index
        self.storage_config = storage_config
        self._reads: IndexReads | None = None
        self._found: dict[str, str | None] = {}

    def digest(self, uri: str) -> str | None:
        if uri not in self._found:
            if self._reads is None:  # run.json of each run: only once a pair needs its bytes compared
                self._reads = IndexReads.of_output(self.index.meta.embeddings, self.storage_config)
            try:
                self._found[uri] = hashlib.sha256(self._reads.read(uri)).hexdigest()
            except BitrayError:  # gone since it was embedded, or refused: not provably the same bytes
                self._found[uri] = None
        return self._found[uri]
