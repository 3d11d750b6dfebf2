"""Commit-path requests that end inside the output lock's fence.

A lease's ``check()`` says only that the last renewal started less than ``ttl/2`` ago; a request sent
right after it through the shared client could take minutes (60 s per try, 4 tries) and land after another
driver took the lease over. So every request that changes what the run owns (a log segment, publishing,
cleanup, the summary, the incremental state) goes through ``Fence.call``: the request is given the lock's
``deadline()`` (its timeouts end there, ``bitray.storage.deadline``), and the fence is checked again after
it, whatever its outcome: a request that ended past the fence, or failed while it passed, stops the run with
``LockLost``, because the store may have applied it while another driver held the lock. A request that ran
out of time while the lock still holds (a slow store; renewals go on) is tried again inside the next
fence, up to ``TRIES`` times: every commit-path request is idempotent or detects its own earlier try
(``storage.create_bytes``).

Example::

    fence = Fence(lock)
    fence.call(lambda deadline: storage.write_bytes(uri, data, cfg, deadline=deadline))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, TypeVar

from bitray import storage
from bitray.locks import LockLost

T = TypeVar("T")

TRIES = 3


class Lock(Protocol):
    def check(self) -> None: ...

    def deadline(self) -> float: ...


class Fence:
    """Runs a lock holder's commit-path requests inside the lock's fence; see the module docstring."""

    def __init__(self, lock: Lock) -> None:
        self.lock = lock

    def call(self, request: Callable[[float | None], T]) -> T:
        """``request(deadline)``: None when the lock cannot be taken from a live holder (a local flock)."""
        tries = 1
        while True:
            try:
                return self._once(request)
            except storage.DeadlinePassed:
                self.lock.check()  # still held: renewals went on, so the next fence ends later
                if tries == TRIES:
                    raise
                tries += 1

    def _once(self, request: Callable[[float | None], T]) -> T:
        deadline = self.lock.deadline()  # raises LockLost once past
        try:
            result = request(None if math.isinf(deadline) else deadline)
        except LockLost:
            raise
        except Exception:
            self.lock.check()  # past the fence: the failure may be the deadline's, the outcome unknown
            raise
        self.lock.check()
        return result
