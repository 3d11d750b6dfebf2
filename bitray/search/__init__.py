"""Use the embeddings: a nearest-neighbour index over an embedding output, search, near-duplicates,
contact sheets and an evaluation that gates one model's embeddings against another's.

One module per job: ``vectors`` (Parquet in row-group batches), ``index`` (build, update, store, load),
``query`` (search by image or by path), ``sheet`` (contact sheets), ``duplicates`` and ``evaluate``.
At bucket scale: ``params`` (index kind and codes under a memory budget), ``shards`` and ``build`` (the
compressed index built by Ray tasks), ``commit`` (compare-and-swap of ``index.json``), ``sharded`` (queries
without loading it whole), ``service`` (Ray actors holding it warm), ``candidates`` (duplicates on it) and
``synthetic`` (outputs for tests and the bench).
"""
