"""HyperRule fine-tuning on Ray Train: one module per job.

- ``run``: the driver (``run_finetune``): list, resolve, train, choose the checkpoint, evaluate, export;
- ``loop``: the per-worker training loop (``TensorflowTrainer`` + ``MultiWorkerMirroredStrategy``);
- ``inputs``: a worker's batches, from the set held in memory or streamed by Ray Data;
- ``sampling``: which images each step sees (a function of the step); ``progress``: rank 0's bar or lines;
- ``evaluation``: validation loss, top-1/top-5, per-class accuracy, confusion matrix, mistakes sheet;
- ``promotion``: whether a new registry version takes the alias (on merit, or always).
"""

from bitray.finetune.run import FinetuneResult, run_finetune

__all__ = ["FinetuneResult", "run_finetune"]
