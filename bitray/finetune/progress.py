"""Rank 0's progress: step, loss, images/s and the time left, for a person watching the run.

In a terminal (the driver's stderr is a TTY) it is a live bar: Ray's ``tqdm_ray`` prints its state from
the worker and the driver draws it with ``tqdm`` (steps, rate, ETA; loss and images/s in the
description). Otherwise (Ray Jobs, a log file) it is one plain log line every ``every_s`` seconds.
"""

from __future__ import annotations

import time


class Progress:
    def __init__(self, first_step: int, total_steps: int, bar: bool, every_s: float = 30.0) -> None:
        self._first, self._total, self._every_s = first_step, total_steps, every_s
        self._started = self._last_line = time.monotonic()
        self._bar = None
        if bar:
            from ray.experimental.tqdm_ray import tqdm

            self._bar = tqdm(desc="fine-tune", total=total_steps, unit="step")
            self._bar.n = first_step  # a resumed run starts where it left off

    def update(self, step: int, loss: float, images_per_s: float) -> None:
        if self._bar is not None:
            self._bar.set_description(f"fine-tune loss {loss:.4f} {images_per_s:,.0f} img/s")
            self._bar.update(step - self._bar.n)
            return
        now = time.monotonic()
        if now - self._last_line < self._every_s and step < self._total:
            return
        self._last_line = now
        done = step - self._first
        left = (now - self._started) / max(done, 1) * (self._total - step)
        eta = time.strftime("%H:%M:%S", time.gmtime(left))
        # printed: Ray forwards a worker's stdout to the driver whatever its logging setup
        print(
            f"fine-tune step {step}/{self._total}  loss {loss:.4f}  {images_per_s:,.0f} images/s  ETA {eta}",
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
