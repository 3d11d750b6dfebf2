"""The embedding pipeline, one module per stage: ``plan`` (list, diff, manifest), ``decode`` (CPU tasks),
``actor`` (BiT), ``write`` (staged files), ``commit`` (exactly-once protocol), ``run`` (the driver).

``state`` keeps what incremental runs need to know of earlier ones, ``settings`` what every run of an output
shares (one model, image size, decode, precision and task); ``layout`` says where everything is.
"""

from bitray.embed.run import RunSummary, dry_run_embedding, new_run_id, run_embedding

__all__ = ["RunSummary", "dry_run_embedding", "new_run_id", "run_embedding"]
