"""Poison isolation: work that killed its Ray worker once is redone in a way that cannot kill it again.

Ray Data retries a map task or an actor call whose worker died, without limit. That is right for a lost
node, and an endless loop for an image that crashes the decoder or the model every time. A ``CrashLedger``
(one Ray actor per pipeline pass, owned by the driver) counts the attempts of each piece of work that began
and never ended. An attempt that finds an earlier one unfinished runs isolated:

- a decode work item (up to 8,192 images; one round trip to the ledger each) whose worker died decodes its
  images one at a time in a child process (``bitray.embed.sandbox``), so each culprit becomes a ``decode``
  error row and the rest of the item is embedded;
- a model actor uses the ledger only once it has been restarted (Ray retries the call that killed it on
  the same actor), so the usual run sends it nothing for model batches. A restarted actor registers each
  batch; a batch that kills it again runs image by image, each image registered first, and the image that
  kills it once more becomes an ``embed`` error row. An image that crashes the model thus costs three actor
  restarts, once.

A lost node looks the same to the ledger, and costs only a slower retry of what it held.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from typing import Any

import numpy as np

from bitray import testhooks

log = logging.getLogger(__name__)

LEDGER_TIMEOUT_S = 60.0
"""How long a task waits for the ledger before it goes on without its protection."""

MODEL_CRASH_COLOUR_ENV = testhooks.MODEL_CRASH_COLOUR
"""Tests only (``bitray.testhooks``): ``"r,g,b"``; a model actor aborts its process (SIGABRT) on a batch
holding an image of that one colour, which is how the tests make an image that kills the model's worker."""


class CrashLedger:
    """Attempts per key that began and have not ended (a Ray actor; see ``start_ledger``)."""

    def __init__(self) -> None:
        self.open: Counter[str] = Counter()

    def begin(self, key: str) -> int:
        """Record an attempt of ``key``; how many earlier ones began and never ended (their worker died)."""
        earlier = self.open[key]
        self.open[key] += 1
        return earlier

    def end(self, key: str) -> None:
        self.open.pop(key, None)


def start_ledger() -> Any:
    """A ``CrashLedger`` actor for one pipeline pass; it goes when the driver drops the handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the driver's node (the head, for a job): worker nodes come and go with the autoscaler
    try:
        where: Any = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    except Exception:  # noqa: BLE001 - e.g. a ray:// client, which has no node of its own
        where = "DEFAULT"
    return ray.remote(num_cpus=0, max_restarts=-1)(CrashLedger).options(scheduling_strategy=where).remote()


class Attempt:
    """One attempt of ``key`` on ``ledger`` (a ``CrashLedger`` handle, or None: nothing is tracked).

    ``earlier`` counts the attempts that died; ``close()`` marks this one ended (call it only on success:
    an attempt that raised is retried by Ray like any other failure, and is not a crash).
    """

    def __init__(self, ledger: Any, key: str) -> None:
        self.ledger, self.key = ledger, key
        self.earlier = 0
        if ledger is not None:
            import ray

            try:
                self.earlier = ray.get(ledger.begin.remote(key), timeout=LEDGER_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError) as exc:  # a lost ledger must not stop the run
                log.warning("crash ledger unavailable (%s); %s runs unprotected", exc, key)

    @property
    def crashed_before(self) -> bool:
        return self.earlier > 0

    def close(self) -> None:
        if self.ledger is not None:
            with contextlib.suppress(Exception):  # no need to wait: a lost call only means a slower retry
                self.ledger.end.remote(self.key)


def model_crash_colour() -> np.ndarray | None:
    """The colour of ``MODEL_CRASH_COLOUR_ENV`` (tests only), or None."""
    value = testhooks.value(MODEL_CRASH_COLOUR_ENV)
    return None if not value else np.array([int(v) for v in value.split(",")], np.uint8)


def abort_on_colour(pixels: np.ndarray, colour: np.ndarray | None) -> None:
    """Tests only: abort when an image of ``pixels`` (uint8 ``[n, h, w, 3]``) is all ``colour``."""
    if colour is not None and (pixels == colour).all(axis=(1, 2, 3)).any():
        os.abort()
