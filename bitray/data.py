"""Labelled image sets for fine-tuning: listing, splitting, Ray Data loading and HyperRule augmentation.

A labelled set is a folder per class (``<root>/<label>/<image>``) or a manifest (``.csv`` or ``.parquet``
with ``path`` and ``label`` columns; relative paths are relative to the manifest). Images are decoded and
resized with ``bitray.images``, the code the embedding pipeline uses, then kept as uint8 for transport.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bitray import storage as st
from bitray.config import IMAGE_EXTENSIONS, StorageConfig
from bitray.errors import BitrayError

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class LabelledSet:
    """Image URIs with their class index into ``classes``."""

    paths: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def digest(self) -> str:
        """sha256 of the (path, label name) list in order-free form: which set a score was measured on."""
        rows = sorted(
            f"{path}\t{self.classes[label]}\n" for path, label in zip(self.paths, self.labels, strict=True)
        )
        return hashlib.sha256("".join(rows).encode()).hexdigest()


def list_labelled(uri: str, storage: StorageConfig | None = None) -> list[tuple[str, str]]:
    """``(image URI, label name)`` pairs of a class-folder tree or a manifest, in a stable order."""
    if uri.lower().endswith(MANIFEST_SUFFIXES):
        pairs = _read_manifest(uri, storage)
    else:
        # local listings give absolute paths: compare against the absolute root, whatever the user typed
        root = uri.rstrip("/") if st.is_remote(uri) else str(st.local_path(uri))
        pairs = []
        for obj in st.list_objects(root, extensions=IMAGE_EXTENSIONS, storage=storage):
            relative = obj.uri[len(root) :].lstrip("/")
            if "/" not in relative:
                continue  # a file beside the class folders, not inside one
            pairs.append((obj.uri, relative.split("/", 1)[0]))
    if not pairs:
        raise BitrayError(
            f"no labelled images found at {uri!r}; expected <root>/<label>/<image> folders or a "
            "manifest .csv/.parquet with path,label columns"
        )
    return sorted(pairs)


def _read_manifest(uri: str, storage: StorageConfig | None) -> list[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = st.read_bytes(uri, storage)
    try:
        # Arrow reads from a BufferReader, never a Python file: see bitray.search.index.load_index
        if uri.lower().endswith(".csv"):
            table = pacsv.read_csv(pa.BufferReader(data))
        else:
            table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:  # pyarrow raises several types for malformed files
        raise BitrayError(f"manifest {uri!r} cannot be parsed: {exc}") from None
    missing = {"path", "label"} - set(table.column_names)
    if missing:
        raise BitrayError(f"manifest {uri!r} lacks column(s) {sorted(missing)}; it needs path,label")
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    pairs = []
    for path, label in zip(table.column("path").to_pylist(), table.column("label").to_pylist(), strict=True):
        if path is None or label is None:
            raise BitrayError(f"manifest {uri!r} has an empty path or label")
        path = str(path)
        absolute = "://" in path or path.startswith("/")
        pairs.append((path if absolute else st.join(base, path), str(label)))
    return pairs


def make_sets(
    data: str,
    validation: str | None,
    val_fraction: float,
    seed: int = 0,
    storage: StorageConfig | None = None,
) -> tuple[LabelledSet, LabelledSet | None]:
    """Training and validation sets. Without ``validation``, a stratified, seeded split of ``data``."""
    pairs = list_labelled(data, storage)
    classes = sorted({label for _, label in pairs})
    if validation is not None:
        train_pairs, val_pairs = pairs, list_labelled(validation, storage)
        unknown = sorted({label for _, label in val_pairs} - set(classes))
        if unknown:
            raise BitrayError(f"validation set {validation!r} has labels not in {data!r}: {unknown[:5]}")
    elif val_fraction > 0:
        train_pairs, val_pairs = split_pairs(pairs, val_fraction, seed)
    else:
        train_pairs, val_pairs = pairs, []
    if len(classes) < 2:
        raise BitrayError(f"{data!r} has {len(classes)} class(es); fine-tuning needs at least 2")
    index = {name: i for i, name in enumerate(classes)}

    def build(items: list[tuple[str, str]]) -> LabelledSet:
        return LabelledSet([p for p, _ in items], [index[label] for _, label in items], classes)

    return build(train_pairs), (build(val_pairs) if val_pairs else None)


def split_pairs(
    pairs: list[tuple[str, str]], fraction: float, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Hold out ``fraction`` of every class (at least one image of classes with two or more)."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[tuple[str, str]]] = {}
    for pair in sorted(pairs):
        by_label.setdefault(pair[1], []).append(pair)
    train, val = [], []
    for label in sorted(by_label):
        items = by_label[label]
        order = rng.permutation(len(items))
        n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
        val += [items[i] for i in order[:n_val]]
        train += [items[i] for i in order[n_val:]]
    return train, val


def few_shot(labelled: LabelledSet, examples_per_class: int, seed: int = 0) -> LabelledSet:
    """A seeded draw of ``examples_per_class`` images of every class (the paper's 1/2/5/10/25-shot sets)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labelled.labels):
        by_class.setdefault(label, []).append(i)
    short = [
        labelled.classes[c]
        for c in range(len(labelled.classes))
        if len(by_class.get(c, [])) < examples_per_class
    ]
    if short:
        raise BitrayError(
            f"examples_per_class {examples_per_class}: class(es) {short[:5]} have fewer training images; "
            "lower examples_per_class or add images"
        )
    chosen = sorted(
        i for c in sorted(by_class) for i in rng.choice(by_class[c], examples_per_class, replace=False)
    )
    return LabelledSet(
        [labelled.paths[i] for i in chosen], [labelled.labels[i] for i in chosen], labelled.classes
    )


HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class AreaSample:
    """The median image area of a seeded sample, read from image headers only."""

    median_area: float
    sampled: int
    skipped: int


def median_image_area(
    paths: list[str], storage: StorageConfig | None = None, sample: int = 256, seed: int = 0
) -> AreaSample:
    """Median ``height * width`` over a seeded sample of ``sample`` images, for the HyperRule's resolution.

    Only the first 64 KiB of each file is read (PIL parses the size from the header without decoding);
    a header that needs more is read whole. Unreadable or undecodable images are skipped; if every
    sampled image is, the set cannot be used and this says so.
    """
    rng = np.random.default_rng(seed)
    picked = [paths[i] for i in sorted(rng.choice(len(paths), min(sample, len(paths)), replace=False))]
    areas, skipped = [], 0
    for uri in picked:
        size = _header_size(uri, storage)
        if size is None:
            skipped += 1
            continue
        areas.append(size[0] * size[1])
    if not areas:
        raise BitrayError(
            f"none of the {len(picked)} sampled images (e.g. {picked[0]!r}) could be read as an image; "
            "check the data URI and the files"
        )
    return AreaSample(float(np.median(areas)), len(areas), skipped)


def _header_size(uri: str, storage: StorageConfig | None) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        fs, path = st.filesystem_for(uri, storage)
        with fs.open_input_stream(path) as stream:
            head = stream.read(HEADER_BYTES)
        for data in (head, None):
            try:
                with Image.open(
                    io.BytesIO(data if data is not None else st.read_bytes(uri, storage))
                ) as image:
                    return image.size
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                if data is None or len(head) < HEADER_BYTES:
                    raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, BitrayError) as exc:
        log.warning("resolution sample: skipping %s (%s)", uri, exc)
    return None


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


# --- HyperRule augmentation (numpy, on the training worker) ---------------------------------------------


def random_crop_flip(
    images: np.ndarray, crop: int, rng: np.random.Generator, index: np.ndarray | None = None
) -> np.ndarray:
    """Random ``crop`` x ``crop`` window and random horizontal flip per image; uint8 in, float [0,1] out.

    ``index`` picks the images (``images[index]``, repeats allowed) in the same gather that crops them.
    A constant number of numpy calls per batch, none per image.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    picked = np.arange(len(images)) if index is None else np.asarray(index)
    n, height, width = len(picked), images.shape[1], images.shape[2]
    tops = rng.integers(0, height - crop + 1, size=n)
    lefts = rng.integers(0, width - crop + 1, size=n)
    flips = rng.random(n) < 0.5
    windows = sliding_window_view(images, (crop, crop), axis=(1, 2))  # [N, h', w', 3, crop, crop], a view
    out = windows[picked, tops, lefts].transpose(0, 2, 3, 1)  # one gather: [n, crop, crop, 3]
    out = np.where(flips[:, None, None, None], out[:, :, ::-1], out)
    return out.astype(np.float32) * np.float32(1 / 255)


def mixup(
    images: np.ndarray, onehot: np.ndarray, alpha: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """MixUp with one lambda ~ Beta(alpha, alpha) for the whole batch; identity when ``alpha`` is 0."""
    if alpha <= 0:
        return images, onehot
    lam = float(rng.beta(alpha, alpha))
    perm = rng.permutation(len(images))
    return lam * images + (1 - lam) * images[perm], lam * onehot + (1 - lam) * onehot[perm]


def eval_images(images: np.ndarray) -> np.ndarray:
    """Validation rows are already resized straight to the crop size; only scale to [0, 1]."""
    return images.astype(np.float32) / 255.0


# --- the digits demo set ------------------------------------------------------------------------------


def iter_digits() -> Iterator[tuple[int, int, bytes]]:
    """``(index, digit, PNG bytes)`` for scikit-learn's 1,797 8x8 digits, scaled 0-16 -> 0-255."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for n, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = np.clip(np.round(image * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        yield n, int(target), buffer.getvalue()


def write_digits(output_uri: str, storage: StorageConfig | None = None) -> int:
    """Write the digits as ``<output>/<digit>/<n>.png``; returns how many images were written."""
    count = 0
    for n, digit, png in iter_digits():
        st.write_bytes(st.join(output_uri, str(digit), f"{n:04d}.png"), png, storage)
        count += 1
    return count
