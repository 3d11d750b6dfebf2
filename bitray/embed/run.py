"""The run driver: lock the output, plan or resume the run, stream it through Ray, commit, record.

The pipeline (``Dataset`` operators, each a module of this package)::

    manifest parts (read_parquet) -> decode_batch (CPU tasks) -> EmbedActor (autoscaling actor pool)
        -> write_files (CPU tasks, one staged file per ``rows_per_file`` rows) -> receipts -> driver commits

Nothing but receipts (a few hundred bytes per output file) comes back to the driver, and the driver keeps
the committed rows as a handful of ranges, so its memory does not depend on the number of images.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from bitray import ray_session, storage
from bitray.config import EmbedConfig
from bitray.embed.actor import EmbedActor
from bitray.embed.cluster import describe_cluster
from bitray.embed.commit import Lock, Receipt, RunCommitter, publisher_for
from bitray.embed.decode import decode_items
from bitray.embed.isolation import start_ledger
from bitray.embed.layout import OutputLayout
from bitray.embed.manifest import PART_ROWS
from bitray.embed.params import InputCounts, RunParams, resolved_storage
from bitray.embed.plan import DryRun, dry_run, start_run
from bitray.embed.ranges import Range
from bitray.embed.resources import ActorResources, actor_resources, check_local_paths, joins_existing_cluster
from bitray.embed.sandbox import DecodeOptions
from bitray.embed.state import IncrementalState, record_run
from bitray.embed.write import write_files
from bitray.errors import BitrayError
from bitray.images import DEFAULT_MAX_PIXELS
from bitray.locks import open_lock
from bitray.precision import check_cpu_precision

log = logging.getLogger(__name__)

MAX_PASSES = 3
"""Passes over what is pending within one invocation: a pass leaves rows pending only when Ray re-ran a
task and its duplicate output was discarded."""
MAX_INPUT_BLOCKS = 4000
"""Work items are spread over at most this many input blocks (a block per item for smaller runs)."""


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


def output_layout(config: EmbedConfig) -> OutputLayout:
    output = config.output.rstrip("/")
    if not storage.is_remote(output):
        output = str(storage.local_path(output))  # Ray workers may run in another directory
    return OutputLayout(output, resolved_storage(config.storage))


def run_embedding(config: EmbedConfig, *, address: str | None = None) -> RunSummary:
    """Embed ``config.inputs`` into ``config.output``; resumes the run when ``config.run_id`` exists there.

    Holds the output's lock for the whole run. Raises ``BitrayError`` for unusable inputs or outputs
    before any Ray work starts.
    """
    started = time.monotonic()
    check_cpu_precision(config.cpu_precision, config.model)
    layout = output_layout(config)
    if joins_existing_cluster(address):
        check_local_paths(config, layout.output, address)
    run_id = config.run_id or new_run_id()
    print(f"bitray: run {run_id} -> {layout.output}", flush=True)
    with open_lock(layout.lock_uri, run_id, storage=layout.storage, ttl_s=config.lock_ttl_s) as lock:
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
            params = start_run(config, layout, run_id, state)
            counts = params.counts
            print(f"bitray: {describe_counts(counts)}", flush=True)
            return _execute(layout, params, state, lock, address, started, fresh=True)[0]
        if changed := params.differences(config):
            print(f"bitray: run {run_id} keeps its own settings: {', '.join(changed)}", flush=True)
        return _execute(layout, params, state, lock, address, started)[0]


def describe_counts(counts: InputCounts) -> str:
    """'12 image(s) to embed (10 new, 0 changed, 2 recorded errors retried), 88 unchanged'."""
    retried = f", {counts.retried} recorded error(s) retried" if counts.retried else ""
    unchanged = f", {counts.unchanged} unchanged" if counts.unchanged else ""
    return f"{counts.todo} image(s) to embed ({counts.new} new, {counts.changed} changed{retried}){unchanged}"


def dry_run_embedding(config: EmbedConfig) -> DryRun:
    """What ``run_embedding(config)`` would do: lists and diffs, writes nothing, starts no Ray work."""
    layout = output_layout(config)
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
    finished = None if fresh else layout.read_summary(run_id)
    if finished is not None:
        state = record_run(layout, state, params)  # in case a crash came between the two
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
    lock.check()
    layout.write_summary(run_id, summary.to_dict())  # first: a run with a summary is recorded on resume
    state = record_run(layout, state, params)
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
            processed += _run_pipeline(layout, params, committer, pending, address)
        except BitrayError as exc:
            if committer.files:
                raise BitrayError(f"{exc}; fix it, then finish the run with --run-id {run_id}") from None
            _discard(layout, run_id)  # e.g. a model that cannot load: let a fixed run start anew
            raise BitrayError(f"{exc}; nothing of run {run_id} was kept") from None
    accounted = committer.embedded + committer.errored
    if accounted != params.rows:
        raise BitrayError(
            f"run {run_id} accounted for {accounted} of {params.rows} inputs; "
            f"run it again with --run-id {run_id} to finish it"
        )
    return processed


def _discard(layout: OutputLayout, run_id: str) -> None:
    """Remove a run that committed nothing: staged leftovers, then its state (``run.json`` with it)."""
    publisher_for(layout).cleanup(run_id)
    storage.delete_tree(layout.run_dir(run_id), layout.storage)


def _run_pipeline(
    layout: OutputLayout,
    params: RunParams,
    committer: RunCommitter,
    pending: list[Range],
    address: str | None,
) -> int:
    import ray

    ray_session.connect(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = True  # Ray Jobs hides them otherwise
    # A block per model batch: Ray would otherwise gather a task's small outputs into 128 MB blocks, and
    # the actors (and commits) would wait for whole decode tasks instead of streaming.
    batch_bytes = params.batch_size * params.image_size[0] * params.image_size[1] * 3
    saved_block_size, ctx.target_max_block_size = ctx.target_max_block_size, batch_bytes
    try:
        resources = actor_resources(params, describe_cluster())
        return _stream(layout, params, committer, pending, resources)
    finally:
        ctx.target_max_block_size = saved_block_size


def _stream(
    layout: OutputLayout,
    params: RunParams,
    committer: RunCommitter,
    pending: list[Range],
    resources: ActorResources,
) -> int:
    import ray

    items = work_items(params, pending, _rows_per_item(params, pending, resources))
    ledger = start_ledger()  # lives as long as this pass: a resumed run starts with a clean slate
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_INPUT_BLOCKS))
    ds = ds.map_batches(
        decode_items,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "manifest_dir": layout.manifest_dir(params.run_id),
            "storage_config": layout.storage,
            "options": decode_options(params),
            "batch_size": params.batch_size,
            "max_bytes": params.max_bytes,
            "committed": committer.committed.as_arrays(),
            "ledger": ledger,
        },
        # Reserving the memory a decoded batch needs also keeps this a separate operator: Ray would
        # otherwise fuse it into its neighbours, and decoding would stall the model instead of overlapping it.
        num_cpus=1,
        memory=_decode_memory(params.batch_size, params.image_size, params.max_decode_mb),
    )
    ds = ds.map_batches(
        EmbedActor,
        batch_size=params.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "model_spec": params.model,
            "storage": layout.storage,
            "threads": resources.threads,
            "precision": resources.precision,
            "task": params.task,
            "top_k": params.top_k,
            "ledger": ledger,
            "model_id": params.model_id,
        },
        compute=ray.data.ActorPoolStrategy(min_size=resources.actors_min, max_size=resources.actors_max),
        num_gpus=resources.gpus,
        num_cpus=resources.cpus,
    )
    ds = ds.map_batches(
        write_files,
        batch_size=params.rows_per_file,
        batch_format="pyarrow",
        fn_kwargs={"layout": layout, "run_id": params.run_id},
        num_cpus=0.25,
        memory=_write_memory(params.rows_per_file),
    )
    processed = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for text in batch.column("receipt").to_pylist():
                receipt = Receipt.model_validate_json(text)
                if committer.offer(receipt):
                    processed += receipt.embedded + receipt.errored
    except BitrayError:
        raise
    except Exception as exc:
        cause = _bitray_cause(exc)
        if cause is not None:
            raise BitrayError(f"the embedding pipeline stopped: {cause}") from None
        raise
    return processed


def decode_options(params: RunParams) -> DecodeOptions:
    """How the run's decode tasks turn bytes into the model's pixels."""
    return DecodeOptions(
        size=params.image_size,
        max_pixels=params.max_pixels or DEFAULT_MAX_PIXELS,
        max_decode_bytes=params.max_decode_mb * 2**20,
        exact=params.decode == "exact",
    )


def work_items(params: RunParams, pending: list[Range], rows_per_item: int) -> list[dict[str, Any]]:
    """The pending rows as ``{part, start, stop}`` pieces of at most ``rows_per_item`` rows in one part.

    One walk over the sorted ranges and the sorted parts: linear in their number, however fragmented.
    """
    items = []
    parts = params.manifest
    first_part = 0
    for start, stop in pending:
        while first_part < len(parts) and parts[first_part].first_row + parts[first_part].rows <= start:
            first_part += 1
        index = first_part
        while index < len(parts) and parts[index].first_row < stop:
            part = parts[index]
            low, high = max(start, part.first_row), min(stop, part.first_row + part.rows)
            for first in range(low, high, rows_per_item):
                last = min(first + rows_per_item, high)
                offset = part.first_row
                items.append({"part": part.name, "start": first - offset, "stop": last - offset})
            index += 1
    return items


def _rows_per_item(params: RunParams, pending: list[Range], resources: ActorResources) -> int:
    """Two items per CPU left for decoding, each at most a manifest part: a decode task reads the part
    it works on with one GET, so large runs cost one request per 8,192 images for it."""
    pending_rows = sum(stop - start for start, stop in pending)
    decoding = max(1, int(resources.cluster_cpus - resources.actors_max * resources.cpus))
    wanted = -(-pending_rows // (2 * decoding))
    batches = -(-wanted // params.batch_size)
    return max(4 * params.batch_size, min(PART_ROWS, batches * params.batch_size))


def _decode_memory(batch_size: int, size: tuple[int, int], max_decode_mb: int) -> int:
    """Bytes a decode task may hold: a batch of uint8 pixels twice over, plus the decode-memory budget of
    the one image it decodes at a time (``bitray.images`` refuses images over it from their header)."""
    return 2 * batch_size * size[0] * size[1] * 3 + max_decode_mb * 2**20


def _write_memory(rows_per_file: int) -> int:
    """A writer holds its rows and their Parquet bytes (2 x 8 KB per 2048-d row), plus the worker itself."""
    return 2 * rows_per_file * 8 * 2**10 + 192 * 2**20


def _bitray_cause(exc: BaseException) -> str | None:
    """The message of a ``BitrayError`` behind a Ray error (e.g. a model spec the actors cannot load).

    Ray keeps the original exception object for task errors, but an actor that fails in ``__init__``
    reaches the driver as ``ActorDiedError`` carrying only the formatted traceback, so read that too.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        original = getattr(current, "cause", None)  # a RayTaskError's own exception, without the traceback
        if isinstance(current, BitrayError) and not isinstance(original, BitrayError):
            return str(current)
        stack += [current.__cause__, current.__context__, original]
    found = re.findall(r"^bitray\.[\w.]*Error: (.+)$", str(exc), flags=re.MULTILINE)
    return found[-1] if found else None
