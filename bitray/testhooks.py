"""Test hooks: the faults the tests inject into real processes, switched on by ``BITRAY_TEST_*`` environment
variables, in one place for the whole package.

Unset in production, where a hook costs one lookup of the environment. The tests set them in the driver's
environment (``tests/conftest.py``, ``monkeypatch``); ``forwarded()`` hands the set ones to the processes a
driver starts (a Ray task's ``runtime_env``, a decoder child), so one mechanism reaches every process.
"""

from __future__ import annotations

import os
import signal

DECODER_CRASH_MARKER = "BITRAY_TEST_DECODER_CRASH_MARKER"
"""The decoder aborts its process (SIGABRT) on any image whose bytes contain this marker: a real crashing
image (``bitray.embed.sandbox``)."""
MODEL_CRASH_COLOUR = "BITRAY_TEST_MODEL_CRASH_COLOUR"
"""``"r,g,b"``: a model actor aborts its process on a batch holding an image of that one colour
(``bitray.embed.isolation``)."""
INDEX_KILL_AFTER = "BITRAY_TEST_INDEX_KILL_AFTER"
"""``N``: the driver of an index build kills itself (SIGKILL) once N shard tasks have finished
(``bitray.search.shards``)."""
SHARD_CRASH = "BITRAY_TEST_SHARD_CRASH"
"""A marker path: the task building shard number 1 exits once (creating the marker) before its commit."""
SCHEDULER_KILL_AT = "BITRAY_TEST_SCHEDULER_KILL_AT"
"""A point's name: the scheduler kills itself (SIGKILL) when it gets there. ``backfill-submitted``: a
backfill job was just submitted and the version's record does not name it yet (``bitray.backfill``)."""
HOOKS = (DECODER_CRASH_MARKER, MODEL_CRASH_COLOUR, INDEX_KILL_AFTER, SHARD_CRASH)
"""The hooks a driver forwards to the processes it starts (the scheduler's hook stays with the scheduler)."""


def value(hook: str) -> str | None:
    """The hook's setting, or None when it is off (unset or empty)."""
    return os.environ.get(hook) or None


def forwarded() -> dict[str, str]:
    """The hooks set in this process, for the environment of the processes it starts."""
    return {hook: os.environ[hook] for hook in HOOKS if os.environ.get(hook)}


def exit_once(hook: str, code: int = 3) -> None:
    """Exit this process at once (no cleanup, like a killed worker) the first time it gets here while the
    marker-path hook is set; the marker file it creates makes the next time (a retry) go on."""
    marker = value(hook)
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(code)


def kill_self() -> None:
    """SIGKILL this process: a driver dying at a chosen point."""
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(hook: str, point: str) -> None:
    """SIGKILL this process when the hook names ``point``."""
    if value(hook) == point:
        kill_self()
