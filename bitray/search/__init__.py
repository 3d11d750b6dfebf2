"""Use the embeddings: a nearest-neighbour index over an embedding output, search, near-duplicates,
contact sheets and an evaluation that gates one model's embeddings against another's.

One module per job: ``vectors`` (Parquet in row-group batches), ``index`` (build, update, store, load),
``query`` (search by image or by path), ``sheet`` (contact sheets), ``duplicates`` and ``evaluate``.
"""
