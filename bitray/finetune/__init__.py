"""HyperRule fine-tuning on Ray Train: one module per job.

- ``run``: the driver (``run_finetune``): list, resolve, train, choose the checkpoint, evaluate, export;
- ``loop``: the per-worker training loop (``TensorflowTrainer`` + ``MultiWorkerMirroredStrategy``);
- ``evaluation``: validation loss, top-1/top-5, per-class accuracy, confusion matrix, mistakes sheet;
- ``promotion``: whether a new registry version takes the alias (on merit, or always).
"""

from bitray.finetune.run import FinetuneResult, run_finetune

__all__ = ["FinetuneResult", "run_finetune"]
