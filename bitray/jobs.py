"""Run bitray pipelines as Ray jobs: submit, list, status, logs, stop (``bitray submit``, ``bitray jobs``).

What a job carries: its runtime environment ships a staged ``working_dir`` holding the config file and the
pipeline's entrypoint script (``pipelines/<name>.py``), plus the local ``bitray`` package as a
``py_modules`` entry, so the code that runs on the cluster is the code it was submitted from. The cluster
only needs bitray's dependencies (TensorFlow, Ray, ...), which the ``cluster.yaml`` setup commands install
with bitray itself. ``ship_bitray=False`` runs the bitray the cluster has installed instead.

Paths inside the config are read on the cluster: use object-store URIs (``s3://...``), not laptop paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

import bitray
from bitray.config import read_yaml
from bitray.errors import BitrayError
from bitray.redaction import redacted

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

PIPELINES = ("embed", "finetune")
PIPELINES_DIR = Path(bitray.__file__).resolve().parent.parent / "pipelines"
"""The entrypoint scripts live beside the package in a bitray checkout (they are not part of the wheel)."""

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class JobInfo:
    """What ``bitray jobs`` shows about one job."""

    submission_id: str
    status: str
    message: str = ""
    entrypoint: str = ""
    start_time: float | None = None
    """Seconds since the epoch (Ray reports milliseconds)."""
    end_time: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def reason(self) -> str:
        """Ray's message in one line, without the log tail it appends to a failed job's message."""
        first = self.message.strip().splitlines()[0] if self.message.strip() else ""
        return first.split(", last available logs")[0]

    @classmethod
    def from_details(cls, details: Any) -> JobInfo:
        status = getattr(details.status, "value", str(details.status))
        return cls(
            submission_id=details.submission_id or details.job_id or "",
            status=str(status),
            message=details.message or "",
            entrypoint=details.entrypoint or "",
            start_time=details.start_time / 1000 if details.start_time else None,
            end_time=details.end_time / 1000 if details.end_time else None,
            metadata=dict(details.metadata or {}),
        )


def resolve_address(address: str | None) -> str:
    """``--address`` wins, then ``RAY_ADDRESS``; the dashboard's address, e.g. ``http://HEAD:8265``."""
    resolved = address or os.environ.get("RAY_ADDRESS")
    if not resolved:
        raise BitrayError(
            "no Ray cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
            "(for a cluster from cluster.yaml, run `ray dashboard cluster.yaml` and use http://127.0.0.1:8265)"
        )
    return resolved


def config_digest(config_path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> str:
    """A short hash naming a config (file bytes plus overrides): same config, same digest."""
    digest = hashlib.sha256(Path(config_path).read_bytes())
    if overrides:
        digest.update(yaml.safe_dump(dict(overrides), sort_keys=True).encode())
    return digest.hexdigest()[:12]


def stage_job(
    pipeline: str,
    config_path: str | os.PathLike[str],
    staging_dir: Path,
    overrides: Mapping[str, Any] | None = None,
    extra_args: Sequence[str] = (),
) -> str:
    """Fill ``staging_dir`` (the job's working_dir) with the config and the entrypoint script; return the
    job's entrypoint command. ``overrides`` are merged into the staged copy of the config.

    The entrypoint is ``python pipelines/<pipeline>.py --config <file>``; where bitray is installed without
    its checkout (no ``pipelines/`` folder), ``python -m bitray <pipeline> --config <file>``, which is the
    same command.
    """
    if pipeline not in PIPELINES:
        raise BitrayError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(PIPELINES)}")
    data = read_yaml(config_path)  # a clear error for a missing or malformed file, before any upload
    data.update(overrides or {})
    config_name = Path(config_path).name
    staging_dir.mkdir(parents=True)
    (staging_dir / config_name).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    script = PIPELINES_DIR / f"{pipeline}.py"
    if script.is_file():
        (staging_dir / "pipelines").mkdir()
        shutil.copy2(script, staging_dir / "pipelines" / script.name)
        command = ["python", f"pipelines/{pipeline}.py"]
    else:
        command = ["python", "-m", "bitray", pipeline]
    return " ".join(shlex.quote(a) for a in [*command, "--config", config_name, *extra_args])


def runtime_env_for(
    staging_dir: Path, env: Mapping[str, str] | None = None, *, ship_bitray: bool = True
) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {
        "working_dir": str(staging_dir),
    }
    if env:
        # Only the user's variables: a key also set by a pipeline's own ray.init(runtime_env=...) makes
        # Ray refuse to merge the two. bitray's own settings come from `import bitray` in each process.
        runtime_env["env_vars"] = dict(env)
    if ship_bitray:
        runtime_env["py_modules"] = [str(Path(bitray.__file__).resolve().parent)]
        runtime_env["excludes"] = ["__pycache__", "*.pyc"]
    return runtime_env


class Jobs:
    """A connection to one Ray cluster's job server, with errors turned into ``BitrayError``."""

    def __init__(self, address: str | None = None) -> None:
        self.address = resolve_address(address)
        self._client = _connect(self.address)

    @property
    def client(self) -> JobSubmissionClient:
        return self._client

    def submit(
        self,
        pipeline: str,
        config_path: str | os.PathLike[str],
        *,
        submission_id: str | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        extra_args: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        ship_bitray: bool = True,
        entrypoint_num_cpus: float | None = None,
        entrypoint_num_gpus: float | None = None,
    ) -> str:
        """Submit ``pipelines/<pipeline>.py --config <file>``; returns the submission id.

        A ``submission_id`` that the cluster has already seen is refused (Ray never reuses one), which is
        what makes scheduled windows run at most once.
        """
        with tempfile.TemporaryDirectory(prefix="bitray-job-") as tmp:
            staging = Path(tmp) / "job"
            entrypoint = stage_job(pipeline, config_path, staging, overrides, extra_args)
            config_name = Path(config_path).name
            meta = {
                "bitray.pipeline": pipeline,
                "bitray.config": config_name,
                "bitray.config_digest": config_digest(config_path, overrides),
                "bitray.version": bitray.__version__,
                **(metadata or {}),
            }
            with self._errors(f"submitting the {pipeline} job", submission_id=submission_id):
                return self._client.submit_job(
                    entrypoint=entrypoint,
                    submission_id=submission_id,
                    runtime_env=runtime_env_for(staging, env, ship_bitray=ship_bitray),
                    metadata=meta,
                    entrypoint_num_cpus=entrypoint_num_cpus,
                    entrypoint_num_gpus=entrypoint_num_gpus,
                )

    def status(self, submission_id: str) -> JobInfo:
        with self._errors(f"reading the status of job {submission_id!r}"):
            return JobInfo.from_details(self._client.get_job_info(submission_id))

    def list(self) -> list[JobInfo]:
        with self._errors("listing jobs"):
            jobs = [JobInfo.from_details(d) for d in self._client.list_jobs()]
        return sorted(jobs, key=lambda j: j.start_time or 0)

    def logs(self, submission_id: str) -> str:
        with self._errors(f"reading the logs of job {submission_id!r}"):
            return self._client.get_job_logs(submission_id)

    def follow(self, submission_id: str, write: Callable[[str], object]) -> JobInfo:
        """Stream the job's logs to ``write`` until it ends; returns its final state."""
        self.status(submission_id)  # a clear error for an unknown id before streaming

        async def tail() -> None:
            async for chunk in self._client.tail_job_logs(submission_id):
                write(chunk)

        with self._errors(f"following the logs of job {submission_id!r}"):
            asyncio.run(tail())
        return self.wait(submission_id, timeout_s=60)

    def stop(self, submission_id: str, *, wait_s: float = 30) -> JobInfo:
        """Ask the job to stop and wait (up to ``wait_s``) until Ray reports it ended."""
        with self._errors(f"stopping job {submission_id!r}"):
            self._client.stop_job(submission_id)
        return self.wait(submission_id, timeout_s=wait_s)

    def wait(self, submission_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0) -> JobInfo:
        """Poll until the job ends (or ``timeout_s`` passes); returns its last state."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            info = self.status(submission_id)
            if info.is_terminal or (deadline is not None and time.monotonic() >= deadline):
                return info
            time.sleep(poll_s)

    @contextlib.contextmanager
    def _errors(self, doing: str, submission_id: str | None = None) -> Iterator[None]:
        """Turn the job client's exceptions into one ``BitrayError`` that says what to do."""
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError:
            raise BitrayError(auth_message(self.address)) from None
        except (RuntimeError, ConnectionError) as exc:
            text = str(exc)
            if submission_id is not None and "already exists" in text:
                raise SubmissionIdTaken(
                    f"submission id {submission_id!r} was already used on the cluster at "
                    f"{redacted(self.address)} (Ray never reuses one); omit --submission-id or choose a "
                    "new one"
                ) from None
            if "does not exist" in text or "status code 404" in text:
                raise JobNotFound(
                    f"{doing}: no such job on the cluster at {redacted(self.address)}; see `bitray jobs list`"
                ) from None
            if isinstance(exc, ConnectionError) or "Failed to connect" in text:
                raise BitrayError(unreachable_message(self.address)) from None
            last = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
            where = redacted(self.address)
            raise BitrayError(f"{doing} failed on the cluster at {where}: {redacted(last)}") from None


class SubmissionIdTaken(BitrayError):
    """The cluster has already seen this submission id."""


class JobNotFound(BitrayError):
    """The cluster does not know this submission id (never submitted, or forgotten by a new head)."""


class JobFailed(BitrayError):
    """A job ended in FAILED or STOPPED."""


def unreachable_message(address: str) -> str:
    return (
        f"cannot reach the Ray job server at {redacted(address)}: check --address or RAY_ADDRESS "
        "(the dashboard address, port 8265 by default) and that the cluster is up; for a cluster.yaml "
        "cluster, keep `ray dashboard cluster.yaml` running and use http://127.0.0.1:8265"
    )


def auth_message(address: str) -> str:
    return (
        f"the Ray cluster at {redacted(address)} requires an authentication token: set "
        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or put the token in ~/.ray/auth_token), as printed by "
        "`ray get-auth-token`"
    )


def _connect(address: str) -> JobSubmissionClient:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise BitrayError(auth_message(address)) from None
    except ConnectionError:
        raise BitrayError(unreachable_message(address)) from None
    except ValueError as exc:  # a malformed address
        raise BitrayError(f"invalid Ray address {redacted(address)!r}: {redacted(exc)}") from None
    except RuntimeError as exc:  # something answered, but not Ray's job server
        raise BitrayError(
            f"{redacted(address)} answered, but not as a Ray job server ({redacted(exc)}); point "
            "--address or RAY_ADDRESS at the Ray dashboard (port 8265 by default)"
        ) from None


def check_succeeded(info: JobInfo, logs_tail: str = "") -> JobInfo:
    """Raise ``JobFailed`` naming the job, its state and Ray's message unless it succeeded."""
    if info.status == "SUCCEEDED":
        return info
    hint = (
        f"; last log lines:\n{logs_tail}" if logs_tail else f"; see `bitray jobs logs {info.submission_id}`"
    )
    raise JobFailed(f"job {info.submission_id} {info.status.lower()}: {info.reason}{hint}")


def submit(
    pipeline: str,
    config_path: str | os.PathLike[str],
    address: str | None = None,
    *,
    submission_id: str | None = None,
    wait: bool = False,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    ship_bitray: bool = True,
    write: Callable[[str], object] | None = None,
) -> JobInfo:
    """Submit a pipeline job; with ``wait``, follow it to the end and raise ``JobFailed`` unless it
    succeeded. ``write`` receives the streamed logs (default: none)."""
    jobs = Jobs(address)
    job_id = jobs.submit(
        pipeline,
        config_path,
        submission_id=submission_id,
        env=env,
        extra_args=extra_args,
        ship_bitray=ship_bitray,
    )
    if not wait:
        return jobs.status(job_id)
    info = jobs.follow(job_id, write) if write is not None else jobs.wait(job_id)
    return check_succeeded(info, "" if write is not None else tail_lines(jobs.logs(job_id)))


def tail_lines(text: str, n: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])
