"""Labelled image sets for fine-tuning: listing, splitting, few-shot draws and the resolution sample.

A labelled set is a folder per class (``<root>/<label>/<image>``) or a manifest (``.csv`` or ``.parquet``
with ``path`` and ``label`` columns; relative paths are relative to the manifest). Decoding them is
``bitray.finetune.decode``; augmenting batches is ``bitray.finetune.augment``.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

import numpy as np

from bitray import storage as st
from bitray.config import IMAGE_EXTENSIONS, StorageConfig
from bitray.errors import BitrayError

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
