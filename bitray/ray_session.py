"""Joining a Ray cluster, the one way every pipeline does it."""

from __future__ import annotations

import os

from bitray.errors import BitrayError


def connect(address: str | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local Ray when neither is set.

    Nothing bitray needs is set through ``runtime_env`` here: ``import bitray`` configures each process,
    and a key set both here and by a Ray job's own runtime env makes Ray refuse to start the job.
    """
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as exc:
        target = address or os.environ.get("RAY_ADDRESS")
        raise BitrayError(
            f"cannot connect to the Ray cluster at {target!r}: {exc}; check --address or RAY_ADDRESS"
        ) from None
