"""The run's life: lock the output, plan or resume the run, pass over what is pending, record it.

Each pass is a Ray pipeline (``bitray.embed.pipeline``) whose receipts the driver commits
(``bitray.embed.commit``). The driver keeps the committed rows as a handful of ranges, so its memory does
not depend on the number of images.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from bitray import storage
from bitray.collection import following, migrated_root
from bitray.config import EmbedConfig
from bitray.embed import pipeline
from bitray.embed.commit import RunCommitter, publisher_for
from bitray.embed.fence import Fence, Lock
from bitray.embed.layout import OutputLayout, output_layout
from bitray.embed.params import InputCounts, RunParams
from bitray.embed.plan import DryRun, dry_run, start_run
from bitray.embed.resources import check_local_paths, joins_existing_cluster
from bitray.embed.state import IncrementalState, record_run
from bitray.errors import BitrayError
from bitray.locks import LockLost, open_lock
from bitray.precision import check_cpu_precision

log = logging.getLogger(__name__)

MAX_PASSES = 3
"""Passes over what is pending within one invocation: a pass leaves rows pending only when Ray re-ran a
task and its duplicate output was discarded."""


@dataclass(frozen=True)
class RunSummary:
    """What one run accounted for. ``inputs == embedded + errored`` always holds for a finished run."""

    run_id: str
    output: str
    inputs: int
    embedded: int
    errored: int
    model_id: str | None
    seconds: float
    """Wall time of this invocation (a resumed run counts only its own work)."""
    images_per_s: float
    """Images processed by this invocation per second."""
    processed: int = 0
    """Images this invocation embedded or recorded as errors (0 when the run had finished already)."""
    unchanged: int = 0
    """Incremental runs: listed object versions already recorded by earlier runs."""
    files: int = 0
    """Data files (embeddings and errors) the run published."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def run_embedding(config: EmbedConfig, *, address: str | None = None) -> RunSummary:
    """Embed ``config.inputs`` into ``config.output``; resumes the run when ``config.run_id`` exists there.

    Holds the output's lock for the whole run. Raises ``BitrayError`` for unusable inputs or outputs
    before any Ray work starts.
    """
    started = time.monotonic()
    check_cpu_precision(config.cpu_precision, config.model)
    config = following(config)
    layout = output_layout(config)
    if joins_existing_cluster(address):
        check_local_paths(config, layout.output, address)
    run_id = config.run_id or new_run_id()
    print(f"bitray: run {run_id} -> {layout.output}", flush=True)
    with open_lock(layout.lock_uri, run_id, storage=layout.storage, ttl_s=config.lock_ttl_s) as lock:
        if migrated_root(layout.output, layout.storage):  # planned at ROOT as its v0 moved away
            raise BitrayError(
                f"{layout.output}'s own data moved to {layout.output}/versions/v0 (bitray outputs migrate) "
                "as this run started; run it again"
            )
        state = IncrementalState.load(layout)
        params = RunParams.load_if_begun(layout, run_id) if config.run_id else None  # a new id is new
        others = [r for r in layout.run_ids() if r != run_id]
        unfinished = [r for r in others if r not in state.finished and layout.is_begun(r)]
        if config.incremental or config.retry_errors:
            for other in unfinished:
                print(f"bitray: finishing the interrupted run {other} first", flush=True)
                _, state = _execute(
                    layout, RunParams.load(layout, other), state, lock, address, time.monotonic()
                )
        elif params is None and (unfinished or state.finished):
            held = unfinished or state.finished
            raise BitrayError(
                f"output {layout.output} already holds run(s) {', '.join(held[:3])}; resume one with "
                f"--run-id {held[-1]}, add only new images with --incremental, or choose another --output"
            )
        if params is None:
            params = start_run(config, layout, run_id, state, fence=Fence(lock))
            counts = params.counts
            print(f"bitray: {describe_counts(counts)}", flush=True)
            return _execute(layout, params, state, lock, address, started, fresh=True)[0]
        if changed := params.differences(config):
            print(f"bitray: run {run_id} keeps its own settings: {', '.join(changed)}", flush=True)
        return _execute(layout, params, state, lock, address, started)[0]


def describe_counts(counts: InputCounts) -> str:
    """'12 image(s) to embed (10 new, 0 changed, 2 recorded errors retried), 88 unchanged, 3 deleted'."""
    retried = f", {counts.retried} recorded error(s) retried" if counts.retried else ""
    unchanged = f", {counts.unchanged} unchanged" if counts.unchanged else ""
    deleted = f", {counts.deleted} deleted" if counts.deleted else ""
    todo = f"{counts.todo} image(s) to embed ({counts.new} new, {counts.changed} changed{retried})"
    return todo + unchanged + deleted


def dry_run_embedding(config: EmbedConfig) -> DryRun:
    """What ``run_embedding(config)`` would do: lists and diffs, writes nothing, starts no Ray work."""
    layout = output_layout(following(config))
    return dry_run(config, layout, IncrementalState.load(layout), layout.run_ids())


def _execute(
    layout: OutputLayout,
    params: RunParams,
    state: IncrementalState,
    lock: Lock,
    address: str | None,
    started: float,
    *,
    fresh: bool = False,
) -> tuple[RunSummary, IncrementalState]:
    """Embed what of the run is not committed, then record it as finished; its summary and the new state.

    ``fresh``: the run was planned by this invocation, so it has no log and no summary yet.
    """
    run_id = params.run_id
    fence = Fence(lock)
    finished = None if fresh else layout.read_summary(run_id)
    if finished is not None:
        state = record_run(layout, state, params, fence)  # in case a crash came between the two
        print("bitray: run already finished; nothing to do", flush=True)
        return RunSummary(**{**finished, "seconds": 0.0, "images_per_s": 0.0, "processed": 0}), state
    processed = 0
    counts = {"embedded": 0, "errored": 0, "files": 0, "models": set()}
    committer = None
    if params.rows:  # an incremental run that found nothing new has nothing to commit
        committer = RunCommitter(layout, run_id, lock, fresh=fresh)
        processed = _embed_pending(layout, params, committer, address)
        committer.finish()
        counts = {"embedded": committer.embedded, "errored": committer.errored, "files": committer.files,
                  "models": committer.models}  # fmt: skip
    seconds = time.monotonic() - started
    summary = RunSummary(
        run_id=run_id,
        output=layout.output,
        inputs=params.rows,
        embedded=counts["embedded"],
        errored=counts["errored"],
        model_id=", ".join(sorted(counts["models"])) or None,
        seconds=round(seconds, 3),
        images_per_s=round(processed / seconds, 3) if seconds > 0 else 0.0,
        processed=processed,
        unchanged=params.counts.unchanged,
        files=counts["files"],
    )
    # the summary first: a run with a summary is recorded on resume
    fence.call(lambda deadline: layout.write_summary(run_id, summary.to_dict(), deadline=deadline))
    state = record_run(layout, state, params, fence)
    if committer is not None:
        committer.forget()
    return summary, state


def _embed_pending(
    layout: OutputLayout, params: RunParams, committer: RunCommitter, address: str | None
) -> int:
    """Run the pipeline over what is pending until every input is committed; images processed."""
    run_id = params.run_id
    processed = 0
    for _ in range(MAX_PASSES):
        pending = list(committer.committed.missing(params.rows))
        if not pending:
            break
        try:
            processed += pipeline.run_pipeline(layout, params, committer, pending, address)
        except LockLost:
            raise  # the run may be another driver's now: touch nothing
        except BitrayError as exc:
            if committer.logged or committer.files:  # a logged receipt is rolled forward, never discarded
                raise BitrayError(f"{exc}; fix it, then finish the run with --run-id {run_id}") from None
            # nothing logged (e.g. a model that cannot load): a fixed run starts anew
            _discard(layout, run_id, committer.fence)
            raise BitrayError(f"{exc}; nothing of run {run_id} was kept") from None
    accounted = committer.embedded + committer.errored
    if accounted != params.rows:
        raise BitrayError(
            f"run {run_id} accounted for {accounted} of {params.rows} inputs; "
            f"run it again with --run-id {run_id} to finish it"
        )
    return processed


def _discard(layout: OutputLayout, run_id: str, fence: Fence) -> None:
    """Remove a run that logged nothing: staged leftovers, then its state (``run.json`` with it).

    Only while this driver holds the lock, each request inside its fence: once the lease is lost, the run
    may be the taker's (an ``--incremental`` run resumes an interrupted run under the same id).
    """
    publisher_for(layout).cleanup(run_id, fence)
    run_dir = layout.run_dir(run_id)
    fence.call(lambda deadline: storage.delete_tree(run_dir, layout.storage, deadline=deadline))
