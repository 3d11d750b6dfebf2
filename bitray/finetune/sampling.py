"""Which training images an optimizer step sees, as a pure function of the step (sets held in memory).

- A set of at least ``batch`` images: epochs are seeded permutations of the whole set
  (``default_rng([seed, epoch]).permutation(n)``), laid end to end; optimizer step ``s`` takes the
  ``batch`` positions from ``s * batch`` of that stream. Every image is seen once per epoch; a batch
  that straddles two epochs takes the end of one permutation and the start of the next.
- A set smaller than ``batch`` (few-shot): every step draws ``batch`` images uniformly *with*
  replacement, seeded by ``(seed, step)``, as the reference code's ``RandomSampler(replacement=True)``.

Worker ``rank`` of ``world`` takes positions ``[rank * local, (rank + 1) * local)`` of every
micro-batch, so the workers' images together are exactly the global batch, whatever the worker count.
Nothing depends on history: a run resumed at step ``s`` after a worker was killed sees the same images
(and, with ``augment_rng``, the same crops, flips and MixUp) as a run that never stopped.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_ORDER, _REPLACEMENT, _AUGMENT = 0, 1, 2  # separate seed streams


@lru_cache(maxsize=4)
def _epoch(epoch: int, n: int, seed: int) -> np.ndarray:
    order = np.random.default_rng([seed, _ORDER, epoch]).permutation(n)
    order.setflags(write=False)
    return order


def step_indices(step: int, n: int, batch: int, seed: int = 0) -> np.ndarray:
    """The global batch of optimizer step ``step`` (0-based): ``batch`` indices into a set of ``n``."""
    if n < batch:
        return np.random.default_rng([seed, _REPLACEMENT, step]).integers(0, n, batch)
    start = step * batch
    first, last = start // n, (start + batch - 1) // n
    stream = np.concatenate([_epoch(e, n, seed) for e in range(first, last + 1)])
    offset = start - first * n
    return stream[offset : offset + batch]


def worker_indices(
    step: int, n: int, batch: int, micro_batch: int, world: int, rank: int, seed: int = 0
) -> np.ndarray:
    """This worker's share of step ``step``: ``[batch // micro_batch, micro_batch // world]`` indices."""
    accumulation, local = batch // micro_batch, micro_batch // world
    return step_indices(step, n, batch, seed).reshape(accumulation, world, local)[:, rank, :]


def augment_rng(step: int, rank: int, seed: int = 0) -> np.random.Generator:
    """The generator of one worker's crops, flips and MixUp at ``step``."""
    return np.random.default_rng([seed, _AUGMENT, step, rank])
