"""Sets of manifest rows as sorted, disjoint, half-open ranges ``[start, end)``.

A run's progress is a handful of ranges however many rows it has, as long as work is committed roughly in
manifest order: the driver keeps what is committed in one of these, not a set of rows or of files.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

import numpy as np

Range = tuple[int, int]


class RowRanges:
    def __init__(self, ranges: Iterable[Range] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        """Add ``[start, end)``, merging it with the ranges it touches."""
        if start >= end:
            return
        i = bisect.bisect_left(self._ends, start)  # first range that ends at or after start
        j = bisect.bisect_right(self._starts, end)  # ranges before j start at or before end
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._ends, start)  # first range ending after start
        return i < len(self._starts) and self._starts[i] < end

    def missing(self, total: int) -> Iterator[Range]:
        """The ranges of ``[0, total)`` not in this set."""
        position = 0
        for start, end in zip(self._starts, self._ends, strict=True):
            if start > position:
                yield position, min(start, total)
            position = max(position, end)
            if position >= total:
                return
        if position < total:
            yield position, total

    def __iter__(self) -> Iterator[Range]:
        return iter(zip(self._starts, self._ends, strict=True))

    def __len__(self) -> int:
        """The number of rows (not of ranges)."""
        return sum(end - start for start, end in self)

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self._starts, np.int64), np.asarray(self._ends, np.int64)


def ranges_of(rows: np.ndarray) -> list[Range]:
    """The sorted ranges that hold exactly the (unique) row numbers ``rows``."""
    if len(rows) == 0:
        return []
    rows = np.sort(np.asarray(rows, np.int64))
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.concatenate([[0], breaks])]
    ends = rows[np.concatenate([breaks - 1, [len(rows) - 1]])] + 1
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def contains(starts: np.ndarray, ends: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each row number, whether it lies in one of the sorted disjoint ranges (vectorised)."""
    i = np.searchsorted(ends, rows, side="right")
    inside = np.zeros(len(rows), bool)
    valid = i < len(starts)
    inside[valid] = starts[i[valid]] <= rows[valid]
    return inside
