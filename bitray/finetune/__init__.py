"""HyperRule fine-tuning on Ray Train: one module per job.

- ``run``: the driver (``run_finetune``): list, resolve, train, choose the checkpoint, evaluate, export;
- ``loop``: the per-worker training loop (``TensorflowTrainer`` + ``MultiWorkerMirroredStrategy``);
- ``data``: labelled sets (listing, splits, few-shot draws, the resolution sample);
- ``decode``: a set decoded for training, streamed by Ray Data or held in memory;
- ``augment``: HyperRule's crop, flip and MixUp of whole batches;
- ``inputs``: a worker's batches, from the set held in memory or streamed by Ray Data;
- ``sampling``: which images each step sees (a function of the step); ``progress``: rank 0's bar or lines;
- ``evaluation``: validation loss, top-1/top-5, per-class accuracy, confusion matrix, mistakes sheet;
- ``promotion``: whether a new registry version takes the alias (on merit, or always).

``run_finetune`` is imported on first use, so that reading a labelled set (``bitray.finetune.data``, also
used by ``bitray evaluate``) does not import the trainer, MLflow and TensorFlow.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FinetuneResult", "run_finetune"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bitray.finetune import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
