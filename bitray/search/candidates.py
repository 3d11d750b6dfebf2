"""Near-duplicate candidates of a compressed index, confirmed with exact cosine.

Every live vector (read exactly, a row-group batch at a time, from the embedding Parquet) queries the
compressed index for its ``CANDIDATES`` nearest; pairs whose approximate similarity reaches
``threshold - MARGIN`` make their two members candidates. The exact vectors of the candidates (those
already read, plus the rest read by row group) go into a small exact index with their rows, on which
``bitray.search.duplicates`` does its usual exact range search, grouping and byte comparison. Memory: the
candidates' vectors, not the output's. A pair both of whose PQ similarities fall below the margin is missed.
"""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa

from bitray.search import vectors
from bitray.search.index import ROWS_SCHEMA, SearchIndex, exact_index
from bitray.search.sharded import ShardedIndex

CANDIDATES = 16
MARGIN = 0.05
QUERY_BATCH = 1024


def candidate_index(index: ShardedIndex, threshold: float, nprobe: int | None = None) -> SearchIndex:
    """An exact ``SearchIndex`` of the vectors that have a near neighbour by the compressed index."""
    held: dict[int, np.ndarray] = {}
    wanted: set[int] = set()
    for record in index.records:
        rows = index.shard_rows(record["number"])
        all_ids = rows.column("id").to_numpy()
        files = rows.column("file").to_pylist()
        start = 0
        for uri in dict.fromkeys(files):
            for batch in vectors.read_batches([uri], ("embedding",), index.storage, batch_rows=QUERY_BATCH):
                vecs = vectors.to_vectors(batch.column(0))
                ids = all_ids[start : start + len(vecs)]
                start += len(vecs)
                live = ~np.isin(ids, index.masked)
                vecs, ids = vecs[live], ids[live]
                if not len(ids):
                    continue
                sims, found = index.search(vecs, CANDIDATES + 1, nprobe)
                near = (sims >= threshold - MARGIN) & (found >= 0) & (found != ids[:, None])
                for q in np.flatnonzero(near.any(axis=1)):
                    held[int(ids[q])] = vecs[q]
                    wanted.update(int(i) for i in found[q][near[q]])
    missing = np.array(sorted(wanted - held.keys()), np.int64)
    if len(missing):
        for i, vec in zip(missing, index.vectors_of(missing), strict=True):
            held[int(i)] = vec
    ids = np.array(sorted(held), np.int64)
    flat = exact_index(index.meta.dim)
    if len(ids):
        flat.add_with_ids(np.stack([held[int(i)] for i in ids]), ids)
        rows = index.rows_of(ids).select(ROWS_SCHEMA.names)
    else:
        rows = ROWS_SCHEMA.empty_table()
    meta = copy.copy(index.meta)
    meta.kind = "flat"
    return SearchIndex(index.uri, meta, flat, pa.Table.from_batches(rows.to_batches(), ROWS_SCHEMA))
