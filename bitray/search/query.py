"""Search an index by image (embedded with the index's own model) or by a path it holds.

``search`` returns a pyarrow table, one row per neighbour, nearest first: ``rank``, ``path``,
``similarity`` (cosine) and the object version the vector was computed from (``etag``, ``size``,
``mtime``, ``run_id``, ``width``, ``height``). A query by path leaves the query itself out of its results.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from bitray import outputs, storage
from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.search.index import SearchIndex, load_index
from bitray.search.sheet import SheetItem


def search(
    index: SearchIndex | str,
    *,
    image: str | None = None,
    path: str | None = None,
    k: int = 10,
    nprobe: int | None = None,
    storage_config: StorageConfig | None = None,
) -> pa.Table:
    """The ``k`` nearest neighbours of one query: ``image`` (file or URI) or ``path`` (held by the index)."""
    if (image is None) == (path is None):
        raise BitrayError("give exactly one query: an image (--image FILE_OR_URI) or a path (--path PATH)")
    if k < 1:
        raise BitrayError(f"-k {k}: ask for at least one neighbour")
    if isinstance(index, str):
        index = load_index(index, storage_config)
    if image is not None:
        query = embed_image(image, index, storage_config)
        skip = None
    else:
        skip = index.id_of(_normal(path))
        if skip is None:
            raise BitrayError(
                f"{path!r} is not in index {index.uri!r}; give the path as the embedding output records it "
                "(the object URI), or run bitray index to add newer runs"
            )
        query = index.vectors_of(np.array([skip]))
    sims, ids = index.search(query, k + (skip is not None), nprobe)
    keep = (ids[0] >= 0) & (ids[0] != (-2 if skip is None else skip))
    return neighbours_table(index, sims[0][keep][:k], ids[0][keep][:k])


def neighbours_table(index: SearchIndex, similarities: np.ndarray, ids: np.ndarray) -> pa.Table:
    rows = index.rows_of(ids)
    rows = rows.drop_columns([c for c in ("id", "file", "row") if c in rows.column_names])
    return pa.table(
        {
            "rank": pa.array(np.arange(1, len(ids) + 1), pa.int32()),
            "path": rows.column("path"),
            "similarity": pa.array(np.asarray(similarities, np.float32)),
            **{name: rows.column(name) for name in rows.column_names if name != "path"},
        }
    )


def sheet_items(query: str, results: pa.Table) -> list[SheetItem]:
    """The tiles of a search's contact sheet: the query (framed), then each neighbour with its similarity."""
    items = [SheetItem(query, "query", highlight=True)]
    for path, similarity in zip(
        results.column("path").to_pylist(), results.column("similarity").to_pylist(), strict=True
    ):
        items.append(SheetItem(path, f"{similarity:.3f}"))
    return items


def embed_image(uri: str, index: SearchIndex, storage_config: StorageConfig | None = None) -> np.ndarray:
    """One image as ``[1, dim]`` features of the index's model, decoded and resized as its output's rows
    were (the decode choice and image size the index records), so an indexed image finds itself at ~1."""
    from bitray.images import prepare_for_model

    loaded, forward = _model(index.meta.model_spec, storage_config)
    if loaded.model_id != index.meta.model_id:
        raise BitrayError(
            f"model spec {index.meta.model_spec!r} now loads {loaded.model_id!r}, but index {index.uri!r} "
            f"holds vectors of {index.meta.model_id!r}; re-embed and re-index, or query by --path"
        )
    exact = query_decode(index, storage_config) == "exact"
    data = storage.read_bytes(uri, storage_config)
    pixels, _, _ = prepare_for_model(data, index.meta.image_size, exact=exact)
    scaled = pixels[None].astype(np.float32) * np.float32(1 / 255)  # as the actors scale their uint8 input
    return np.asarray(forward(scaled), np.float32)


def query_decode(index: SearchIndex, storage_config: StorageConfig | None = None) -> str:
    """The decode choice of the index's rows: recorded in the index, else (an index built before it was
    recorded) in its output."""
    if index.meta.decode is not None:
        return index.meta.decode
    settings = outputs.settings(index.meta.embeddings, storage_config)
    if settings is None:
        raise BitrayError(f"index {index.uri!r} does not say how its images were decoded; rebuild it with "
                          "bitray index")  # fmt: skip
    return settings.decode


def _model(spec: str, storage_config: StorageConfig | None):  # noqa: ANN202
    """The loaded model and its traced forward pass, kept for the next query in this process."""
    key = (spec, storage_config.model_dump_json() if storage_config else "")
    return _cached_model(*key)


@functools.lru_cache(maxsize=2)
def _cached_model(spec: str, storage_json: str):  # noqa: ANN202
    from bitray.model import load_model

    config = StorageConfig.model_validate_json(storage_json) if storage_json else None
    loaded = load_model(spec, storage=config)
    return loaded, loaded.inference_function()


def _normal(uri: str) -> str:
    return uri if storage.is_remote(uri) else str(storage.local_path(uri))
