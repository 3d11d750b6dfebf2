"""Ordered prefetch: results of ``fn`` over items, in order, with at most ``ahead`` in flight or waiting.

Reading from object storage is latency-bound: a few requests in flight keep the bandwidth busy while the
caller works on the previous result, and the window bounds the memory held by results not yet consumed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(fn: Callable[[T], R], items: Iterable[T], ahead: int = 8) -> Iterator[R]:
    """``map(fn, items)``, computed by ``ahead`` threads; an exception surfaces where its item would."""
    with ThreadPoolExecutor(ahead) as pool:
        window: deque[Future[R]] = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
