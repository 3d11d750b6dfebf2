"""Ordered prefetch: results in order, computed concurrently, never more than the window outstanding."""

from __future__ import annotations

import threading
import time

import pytest

from bitray.prefetch import prefetched


def test_results_come_in_order_and_overlap():
    def slow(i: int) -> int:
        time.sleep(0.05 * (5 - i % 5))  # later items finish first
        return i * i

    started = time.perf_counter()
    assert list(prefetched(slow, range(10), ahead=5)) == [i * i for i in range(10)]
    assert time.perf_counter() - started < 0.05 * 15 * 0.7  # concurrent: well under the serial time


def test_the_window_bounds_what_is_outstanding():
    lock, active, most = threading.Lock(), [0], [0]

    def tracked(i: int) -> int:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        return i

    consumed = 0
    for _ in prefetched(tracked, range(40), ahead=3):
        consumed += 1
        time.sleep(0.005)
    assert consumed == 40 and most[0] <= 3


def test_an_error_surfaces_at_its_item():
    def fails_at_three(i: int) -> int:
        if i == 3:
            raise ValueError("item 3")
        return i

    results = prefetched(fails_at_three, range(6), ahead=2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="item 3"):
        next(results)
