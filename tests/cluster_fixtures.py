"""A real local Ray head with its job server, for the job and schedule tests (``pytest_plugins``).

The head runs as ``ray start --head --block`` in a session of its own, on 127.0.0.1, with its own temp dir
and free ports (so it never meets another Ray on this machine). Teardown ends exactly the processes of that
session (``ray stop`` would stop every Ray cluster on the machine). Jobs run the head's ``python``: the
venv's ``bin`` comes first in its PATH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120


def tiny_embed_config(inputs: str, output: str, **extra) -> dict:
    """An EmbedConfig mapping small enough for a job on the test head (random:tiny, 32 px, 1 actor)."""
    return {
        "inputs": [inputs],
        "output": output,
        "model": "random:tiny",
        "image_size": 32,
        "batch_size": 2,
        "actors_min": 1,
        "actors_max": 1,
        "cpus_per_actor": 1,
        **extra,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_processes(sid: int) -> list[psutil.Process]:
    procs = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                procs.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return procs


def stop_session(sid: int) -> None:
    """SIGTERM every process of the head's session, then SIGKILL what is left after a grace period."""
    procs = session_processes(sid)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=5)  # `ray start --block` ignores SIGTERM
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="session")
def ray_head() -> Iterator[str]:
    """A local Ray head with the dashboard's job server; returns its address ``http://127.0.0.1:PORT``."""
    from ray.job_submission import JobSubmissionClient

    temp_dir = tempfile.mkdtemp(prefix="brh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard_port = free_port()
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "AWS_EC2_METADATA_DISABLED": "true",
        # Ray enables token auth when ~/.ray/auth_token exists; this head is private to the test anyway.
        "RAY_AUTH_MODE": "disabled",
    }
    # Jobs see only what their submission passes, not the test session's S3 or MLflow settings.
    for key in (
        "RAY_ADDRESS",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_TRACKING_URI",
    ):
        env.pop(key, None)
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--dashboard-host", "127.0.0.1",
        "--port", "0",
        "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--num-cpus", "2",
        "--include-dashboard", "true",
        "--temp-dir", temp_dir,
        "--disable-usage-stats",
    ]  # fmt: skip
    log_file = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed at teardown
    head = subprocess.Popen(
        command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.returncode}; see {log_file.name}")
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        stop_session(head.pid)
        head.wait(timeout=30)
        log_file.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
