"""Decoding labelled sets for training: Ray Data datasets streamed per epoch, or the whole set in memory.

Images are decoded and resized with ``bitray.images``, the code the embedding pipeline uses, then kept as
uint8 for transport.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from bitray import storage as st
from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.finetune.data import LabelledSet

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)


def to_ray_dataset(
    labelled: LabelledSet,
    size: int,
    storage: StorageConfig | None = None,
    seed: int = 0,
    min_rows: int = 0,
    exact: bool = True,
) -> ray.data.Dataset:
    """Rows ``{"image": uint8[size, size, 3], "label": int64}`` streamed by Ray Data tasks, for sets
    whose pixels do not fit in memory (those that fit use ``decode_into_memory``).

    The file bytes are read once and kept in Ray's object store; every epoch decodes them again. The
    rows are shuffled once (seeded) so that class-sorted listings do not give one-class batches. A set
    smaller than ``min_rows`` (the global micro-batch) is repeated whole until it has that many rows,
    so every epoch fills a batch on every worker. Ray needs to be connected.
    """
    import ray.data

    repeats = max(1, -(-min_rows // max(1, len(labelled))))
    order = np.concatenate(
        [np.random.default_rng(seed + r).permutation(len(labelled)) for r in range(repeats)]
    )
    items = [{"path": labelled.paths[i], "label": labelled.labels[i]} for i in order]
    blocks = max(1, min(len(items) // 256, 64))
    encoded = (
        ray.data.from_items(items, override_num_blocks=blocks)
        .map_batches(read_labelled_batch, fn_kwargs={"storage": storage}, batch_size=64, batch_format="numpy")
        .materialize()
    )
    return encoded.map_batches(
        decode_encoded_batch, fn_kwargs={"size": size, "exact": exact}, batch_size=64, batch_format="numpy"
    )


def read_labelled_batch(batch: dict[str, np.ndarray], storage: StorageConfig | None) -> dict[str, Any]:
    """The file bytes of a batch of ``path``/``label`` rows; unreadable files are skipped with a warning."""
    paths, labels, blobs = [], [], []
    for path, label in zip(batch["path"], batch["label"], strict=True):
        try:
            blobs.append(st.read_bytes(str(path), storage))
        except BitrayError as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        paths.append(str(path))
        labels.append(int(label))
    return {
        "path": np.asarray(paths, dtype=object),
        "label": np.asarray(labels, np.int64),
        "data": np.asarray(blobs, dtype=object),
    }


def decode_encoded_batch(batch: dict[str, np.ndarray], size: int, exact: bool = True) -> dict[str, Any]:
    """Decode and resize the ``data`` bytes of a batch to uint8 ``size`` x ``size``; bad images skipped."""
    rows = zip(batch["path"], batch["label"], batch["data"], strict=True)
    reads = ((path, label, lambda blob=blob: bytes(blob)) for path, label, blob in rows)
    return _decoded(reads, size, exact=exact)


def decode_labelled_batch(
    batch: dict[str, np.ndarray],
    size: int,
    storage: StorageConfig | None,
    keep_paths: bool = False,
    exact: bool = True,
) -> dict[str, Any]:
    """Read, decode and resize a batch of ``path``/``label`` rows; undecodable images are skipped.

    ``keep_paths`` keeps a ``path`` column beside the decoded rows (for the evaluation's report).
    ``exact=False``: the fast decode (``bitray.images.prepare_for_model``: a JPEG is DCT-scaled to no
    less than ``size``, then box-reduced and resized with antialiasing); ``True``: full-resolution decode.
    """
    rows = zip(batch["path"], batch["label"], strict=True)
    reads = ((path, label, lambda path=path: st.read_bytes(str(path), storage)) for path, label in rows)
    return _decoded(reads, size, keep_paths=keep_paths, exact=exact)


def _decoded(
    rows: Iterator[tuple[Any, Any, Any]], size: int, keep_paths: bool = False, exact: bool = True
) -> dict[str, Any]:
    """(path, label, read bytes) rows -> uint8 images resized to ``size`` x ``size``, with their labels."""
    from bitray.images import ImageDecodeError, prepare_for_model

    images, labels, paths = [], [], []
    for path, label, read in rows:
        try:
            pixels, _, _ = prepare_for_model(read(), (size, size), exact=exact)
        except (ImageDecodeError, BitrayError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        images.append(pixels)
        labels.append(int(label))
        paths.append(str(path))
    extra = {"path": np.asarray(paths, dtype=object)} if keep_paths else {}
    if not images:
        return {"image": np.zeros((0, size, size, 3), np.uint8), "label": np.zeros((0,), np.int64), **extra}
    return {"image": np.stack(images), "label": np.asarray(labels, np.int64), **extra}


def decode_into_memory(
    labelled: LabelledSet, size: int, storage: StorageConfig | None = None, exact: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 images [n, size, size, 3], int64 labels [n])`` of the whole set, in path order.

    Decoded by Ray Data tasks across the cluster (before any training worker holds a CPU) and gathered
    here; undecodable images are skipped with a warning, and a set with none left is refused.
    """
    import ray.data

    items = [{"path": p, "label": label} for p, label in zip(labelled.paths, labelled.labels, strict=True)]
    blocks = max(1, min(len(items) // 64, 64))
    decoded = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        decode_labelled_batch,
        fn_kwargs={"size": size, "storage": storage, "keep_paths": True, "exact": exact},
        batch_size=64,
        batch_format="numpy",
    )
    parts = list(decoded.iter_batches(batch_size=None, batch_format="numpy"))
    parts = [p for p in parts if len(p["label"])]
    if not parts:
        raise BitrayError(
            f"none of the {len(labelled)} images (e.g. {labelled.paths[0]!r}) could be decoded; "
            "check the data and the warnings about skipped images"
        )
    paths = np.concatenate([p["path"] for p in parts])
    order = np.argsort(paths, kind="stable")  # Ray Data's block order varies; the sampling needs one order
    images = np.concatenate([p["image"] for p in parts])[order]
    labels = np.concatenate([p["label"] for p in parts])[order]
    return images, labels
