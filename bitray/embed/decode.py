"""The CPU stage: manifest rows -> the listed version's bytes -> RGB uint8 pixels at the model's size.

A task takes work items (a row range of a manifest part, read with one GET) and yields
one block per model batch, so the actors start on the first batch while the rest is still decoding.
Every input row leaves this stage as one row: pixels, or an error (stage ``read`` or ``decode``, with a
readable reason) and zero pixels. Only permanent read failures (``storage.PermanentReadError``: the object
changed or vanished after listing, access refused, over ``max_bytes``) become error rows; transient ones
are retried by ``storage.read_object`` and, if they persist, stop the run, which then resumes. Rows
already committed by an earlier attempt of the run are dropped here, so a resumed run reads and decodes
only what is pending. Pixels travel as uint8 (a quarter of float32) in a tensor column; the model
function converts them. An image that kills the decoder process becomes a ``decode`` error row too
(``bitray.embed.isolation``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from bitray import storage
from bitray.config import StorageConfig
from bitray.embed.isolation import Attempt
from bitray.embed.manifest import read_part
from bitray.embed.params import RunParams
from bitray.embed.ranges import contains
from bitray.embed.sandbox import DecodeOptions, DecoderCrashed, SandboxDecoder, decode_for_model
from bitray.images import DEFAULT_MAX_PIXELS
from bitray.prefetch import prefetched
from bitray.storage import ObjectInfo

log = logging.getLogger(__name__)

READ_AHEAD = 8
"""Objects a decode task reads at once (threads; the listed versions' bytes held at most), across the
batches of a work item."""

Decoder = Callable[[bytes], tuple[np.ndarray, int, int]]


def decode_options(params: RunParams) -> DecodeOptions:
    """How the run's decode tasks turn bytes into the model's pixels."""
    return DecodeOptions(
        size=params.image_size,
        max_pixels=params.max_pixels or DEFAULT_MAX_PIXELS,
        max_decode_bytes=params.max_decode_mb * 2**20,
        exact=params.decode == "exact",
    )


def decode_memory(params: RunParams) -> int:
    """Bytes a decode task may hold: a batch of uint8 pixels twice over, plus the decode-memory budget of
    the one image it decodes at a time (``bitray.images`` refuses images over it from their header)."""
    height, width = params.image_size
    return 2 * params.batch_size * height * width * 3 + params.max_decode_mb * 2**20


def decode_items(
    items: pa.Table,
    *,
    manifest_dir: str,
    storage_config: StorageConfig,
    options: DecodeOptions,
    batch_size: int,
    max_bytes: int | None,
    committed: tuple[np.ndarray, np.ndarray],
    ledger: Any = None,
) -> Iterator[pa.Table]:
    """Work items (a manifest part and a row range in it) -> one block of decoded rows per model batch.

    ``ledger``: a ``CrashLedger`` handle. An item whose earlier attempt died with its worker is decoded in
    a child process, image by image (``bitray.embed.isolation``).
    """
    read = functools.partial(read_listed, storage_config=storage_config, max_bytes=max_bytes)
    for part, start, stop in zip(
        *(items.column(n).to_pylist() for n in ("part", "start", "stop")), strict=True
    ):
        attempt = Attempt(ledger, f"decode:{part}:{start}:{stop}")
        with contextlib.ExitStack() as stack:
            decode = functools.partial(decode_for_model, options=options)
            if attempt.crashed_before:
                log.warning(
                    "rows %d-%d of manifest %s killed a decode worker %d time(s); decoding them one by one "
                    "in a separate process", start, stop, part, attempt.earlier,
                )  # fmt: skip
                decode = stack.enter_context(SandboxDecoder(options)).decode
            rows = read_part(storage.join(manifest_dir, part), storage_config).slice(start, stop - start)
            rows = pending_rows(rows, committed)
            # one read-ahead window over the whole item: reads for the next batch overlap this one's decoding
            data = prefetched(read, rows.to_pylist(), READ_AHEAD)
            for offset in range(0, rows.num_rows, batch_size):
                batch = rows.slice(offset, batch_size)
                yield decoded_block(batch, itertools.islice(data, batch.num_rows), decode, options.size)
        attempt.close()


def pending_rows(rows: pa.Table, committed: tuple[np.ndarray, np.ndarray]) -> pa.Table:
    """The manifest rows not committed by an earlier attempt of the run."""
    return rows.filter(pa.array(~contains(committed[0], committed[1], rows.column("row").to_numpy())))


def read_listed(
    record: dict, *, storage_config: StorageConfig, max_bytes: int | None
) -> bytes | storage.PermanentReadError:
    """The listed version's bytes, or the permanent failure to record (transient ones raise: the run stops,
    resumably, once ``storage.read_object`` has retried them for ``read_retry_s``)."""
    listed = ObjectInfo(record["path"], record["size"], record["mtime_ns"], record["etag"])
    try:
        return storage.read_object(
            listed, storage_config, max_bytes=max_bytes, retry_for_s=storage_config.read_retry_s
        )
    except storage.PermanentReadError as exc:
        return exc


def decoded_block(
    batch: pa.Table,
    data: Iterable[bytes | storage.PermanentReadError],
    decode: Decoder,
    size: tuple[int, int],
) -> pa.Table:
    """``batch`` with its images' pixels at ``size`` (or the stage and reason of their error), from the
    read results ``data`` (one per row, in order)."""
    from ray.data.extensions import ArrowTensorArray

    paths = batch.column("path").to_pylist()
    pixels = np.zeros((len(paths), *size, 3), np.uint8)
    width = np.zeros(len(paths), np.int32)
    height = np.zeros(len(paths), np.int32)
    stages: list[str | None] = [None] * len(paths)
    errors: list[str | None] = [None] * len(paths)
    for i, result in enumerate(data):
        if isinstance(result, storage.PermanentReadError):
            stages[i], errors[i] = "read", describe(result)
            continue
        try:
            pixels[i], width[i], height[i] = decode(result)
        except DecoderCrashed as exc:
            log.warning("%s crashed the decoder: %s", paths[i], exc)
            stages[i], errors[i] = "decode", describe(exc)
        except Exception as exc:
            stages[i], errors[i] = "decode", describe(exc)
    return (
        batch.append_column("width", pa.array(width))
        .append_column("height", pa.array(height))
        .append_column("stage", pa.array(stages, pa.string()))
        .append_column("error", pa.array(errors, pa.string()))
        .append_column("pixels", ArrowTensorArray.from_numpy(pixels))
    )


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
