"""Where a Train worker's batches come from: two sources behind one interface, chosen once by the driver.

- ``InMemory``: the decoded training (and validation) pixels sit in Ray's object store, put there by the
  driver before training; every worker maps the whole set (zero-copy on its node) and gathers the
  images of each step itself, in the order of ``sampling`` (a seeded permutation per epoch, or draws with
  replacement for a set smaller than a batch). No Ray Data task runs while the workers hold the CPUs,
  and the order is a function of the step: exact on resume.
- ``Streamed``: sets whose pixels do not fit stream from the Ray Data datasets given to the trainer
  (``train``: read and decoded per epoch, ``val``), which need CPUs beside the workers'; the order of
  a resumed run starts a fresh epoch.

Either way a step's inputs are cropped, flipped and mixed as whole batches (``bitray.finetune.augment``),
with a generator seeded by (seed, step, rank).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from bitray.errors import BitrayError
from bitray.finetune import sampling
from bitray.finetune.augment import mixup, random_crop_flip
from bitray.hyperrule import HyperParams

SHUFFLE_BUFFER = 1024


@dataclass(frozen=True)
class Worker:
    """What a source needs to know about the worker that reads it."""

    hyper: HyperParams
    num_classes: int
    rank: int
    world: int
    seed: int

    @property
    def local_micro(self) -> int:
        return self.hyper.micro_batch // self.world


StepInputs = tuple[np.ndarray, np.ndarray]
"""float32 images ``[micro-batches, local, crop, crop, 3]`` in [0, 1] and their (mixed) one-hot targets."""


class Source(Protocol):
    def open(self, worker: Worker) -> Batches: ...


class Batches(Protocol):
    def step_inputs(self, step: int) -> StepInputs: ...

    def validation(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This worker's share of the validation set: ``(uint8 images at the crop size, labels)``."""
        ...


@dataclass(frozen=True)
class InMemory:
    """Object refs of the decoded arrays: ``images`` uint8 ``[n, resize, resize, 3]``, ``labels`` int64."""

    images: Any
    labels: Any
    val_images: Any = None
    val_labels: Any = None

    def open(self, worker: Worker) -> MemoryBatches:
        import ray

        images, labels = ray.get([self.images, self.labels])
        val = ray.get([self.val_images, self.val_labels]) if self.val_images is not None else None
        return MemoryBatches(images, labels, val, worker)


class MemoryBatches:
    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        val: list[np.ndarray] | None,
        worker: Worker,
    ) -> None:
        self._images, self._labels, self._val, self._w = images, labels, val, worker
        self._eye = np.eye(worker.num_classes, dtype=np.float32)

    def step_inputs(self, step: int) -> StepInputs:
        w, hp = self._w, self._w.hyper
        index = sampling.worker_indices(
            step, len(self._labels), hp.batch_size, hp.micro_batch, w.world, w.rank, w.seed
        )
        rng = sampling.augment_rng(step, w.rank, w.seed)
        flat = index.reshape(-1)
        images = random_crop_flip(self._images, hp.crop, rng, flat).reshape(*index.shape, hp.crop, hp.crop, 3)
        return mix(images, self._eye[self._labels[index]], hp.mixup_alpha, rng)

    def validation(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._val is None:
            return
        images, labels = self._val
        mine = np.arange(self._w.rank, len(labels), self._w.world)
        for start in range(0, len(mine), batch_size):
            rows = mine[start : start + batch_size]
            yield images[rows], labels[rows]


@dataclass(frozen=True)
class Streamed:
    """The trainer's Ray Data datasets ``train`` (and ``val``); ``shuffle_buffer`` rows shuffled locally,
    0 when the driver shuffles the dataset globally every epoch."""

    shuffle_buffer: int = SHUFFLE_BUFFER
    has_val: bool = False

    def open(self, worker: Worker) -> StreamBatches:
        import ray.train

        val = ray.train.get_dataset_shard("val") if self.has_val else None
        batches = endless_batches(
            ray.train.get_dataset_shard("train"), worker.local_micro, self.shuffle_buffer
        )
        return StreamBatches(batches, val, worker)


class StreamBatches:
    def __init__(self, batches: Iterator[dict], val_shard: Any, worker: Worker) -> None:  # noqa: ANN401
        self._batches, self._val, self._w = batches, val_shard, worker
        self._eye = np.eye(worker.num_classes, dtype=np.float32)

    def step_inputs(self, step: int) -> StepInputs:
        hp = self._w.hyper
        micro = [next(self._batches) for _ in range(hp.accumulation_steps)]
        rng = sampling.augment_rng(step, self._w.rank, self._w.seed)
        images = np.stack([b["image"] for b in micro])
        labels = np.stack([b["label"] for b in micro])
        flat = images.reshape(-1, *images.shape[2:])
        cropped = random_crop_flip(flat, hp.crop, rng).reshape(*labels.shape, hp.crop, hp.crop, 3)
        return mix(cropped, self._eye[labels], hp.mixup_alpha, rng)

    def validation(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._val is None:
            return
        for batch in self._val.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield batch["image"], batch["label"]


def mix(images: np.ndarray, targets: np.ndarray, alpha: float, rng: np.random.Generator) -> StepInputs:
    """MixUp over one optimizer step's images ``[micro-batches, n, ...]``: one lambda for the whole step,
    partners drawn across its micro-batches, as the reference mixes its one batch."""
    if alpha <= 0:
        return images, targets
    shape, target_shape = images.shape, targets.shape
    flat_x, flat_y = mixup(images.reshape(-1, *shape[2:]), targets.reshape(-1, *target_shape[2:]), alpha, rng)
    return flat_x.reshape(shape), flat_y.reshape(target_shape)


def endless_batches(shard, batch_size: int, shuffle_buffer: int = SHUFFLE_BUFFER):  # noqa: ANN001, ANN201
    """This worker's micro-batches, epoch after epoch (``shuffle_buffer`` rows shuffled locally, 0: none);
    equal counts on every worker.

    The driver repeats a small set until an epoch holds a global micro-batch, so an epoch without a
    single batch means the shard's images could not be decoded: that fails at once, never loops.
    """
    while True:
        formed = 0
        for batch in shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=shuffle_buffer or None,
        ):
            formed += 1
            yield batch
        if not formed:
            raise BitrayError(
                f"cannot form a batch of {batch_size} images on this worker: a whole epoch of its share "
                "of the training set gave fewer decodable images; check the warnings about skipped images"
            )
