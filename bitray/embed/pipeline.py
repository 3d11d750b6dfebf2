"""The Ray pipeline of one pass over a run's pending rows: the stages, assembled.

::

    work items (from_items) -> decode_items (CPU tasks) -> EmbedActor (autoscaling actor pool)
        -> write_files (CPU tasks, one staged file per ``rows_per_file`` rows) -> receipts -> committer

Each stage module says what it needs (``decode_options``/``decode_memory``, ``actor_resources``,
``write_memory``); this module only connects them and hands each receipt to the committer. Nothing but
receipts (a few hundred bytes per output file) comes back to the driver.
"""

from __future__ import annotations

import re
from typing import Any

from bitray import ray_session
from bitray.embed.actor import EmbedActor
from bitray.embed.cluster import describe_cluster
from bitray.embed.commit import Receipt, RunCommitter
from bitray.embed.decode import decode_items, decode_memory, decode_options
from bitray.embed.isolation import start_ledger
from bitray.embed.layout import OutputLayout
from bitray.embed.manifest import PART_ROWS
from bitray.embed.params import RunParams
from bitray.embed.ranges import Range
from bitray.embed.resources import ActorResources, actor_resources
from bitray.embed.write import write_files, write_memory
from bitray.errors import BitrayError

MAX_INPUT_BLOCKS = 4000
"""Work items are spread over at most this many input blocks (a block per item for smaller runs)."""


def run_pipeline(
    layout: OutputLayout,
    params: RunParams,
    committer: RunCommitter,
    pending: list[Range],
    address: str | None,
) -> int:
    """One pass over ``pending``: every receipt is offered to ``committer``; images committed."""
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
        memory=decode_memory(params),
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
        memory=write_memory(params.rows_per_file),
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
