"""Synthetic embedding outputs laid out like real ones, for the search tests and ``bench/search_bench.py``.

``write_run`` writes a finished run: ``OUT/embeddings/part-<run>-<n>.parquet`` files of ``rows_per_file``
rows with the pipeline's columns, the run's ``run.json`` and its entry in the incremental state, so every
reader (``bitray.outputs``, ``bitray index``) sees it as it would a run of ``bitray embed``.

``realistic`` draws vectors shaped like pooled post-ReLU CNN features: a low-rank signal (``rank``
directions with a decaying spectrum hold most of the variance) around cluster centres of Zipf-like uneven
sizes, plus small isotropic noise, passed through a ReLU (non-negative, sparse-ish) and L2-normalised.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bitray import storage
from bitray.config import StorageConfig
from bitray.embed.layout import OutputLayout
from bitray.embed.manifest import ManifestWriter
from bitray.embed.params import InputCounts, ManifestPart, RunParams
from bitray.embed.state import IncrementalState, record_run
from bitray.storage import ObjectInfo

MODEL = "random:tiny"
MODEL_ID = "bit-tiny@random-init"


def write_run(
    output: str,
    run_id: str,
    batches: Iterator[tuple[list[str], np.ndarray]],
    *,
    rows_per_file: int = 8192,
    model_id: str = MODEL_ID,
    deleted: list[str] | None = None,
) -> int:
    """Write ``(paths, vectors)`` batches (each at most ``rows_per_file`` rows) as one finished run, which
    found ``deleted`` paths gone, as an incremental run records them."""
    from bitray.embed.layout import part_name

    layout = OutputLayout(output if storage.is_remote(output) else str(storage.local_path(output)), None)
    total = files = 0
    for n, (paths, vectors) in enumerate(batches):
        dim = vectors.shape[1]
        count = len(paths)
        table = pa.table(
            {
                "path": pa.array(paths, pa.string()),
                "model": pa.array([model_id] * count, pa.string()),
                "width": pa.array([32] * count, pa.int32()),
                "height": pa.array([32] * count, pa.int32()),
                "etag": pa.array([f"{run_id}-{p.rsplit('/', 1)[-1]}" for p in paths], pa.string()),
                "size": pa.array([1000] * count, pa.int64()),
                "mtime": pa.array([0] * count, pa.timestamp("ns", tz="UTC")),
                "run_id": pa.array([run_id] * count, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(np.ascontiguousarray(vectors, np.float32).ravel()), dim
                ),
            }
        )
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, row_group_size=1024)
        uri = storage.join(layout.data_dir("embeddings"), part_name(run_id, f"{n:06d}"))
        storage.write_bytes(uri, buffer.getvalue().to_pybytes())
        total += count
        files = n + 1
    writer = ManifestWriter(layout.deleted_dir(run_id), StorageConfig())
    for path in sorted(deleted or []):
        writer.add(ObjectInfo(path, 0))
    params = RunParams(
        run_id=run_id,
        model=MODEL,
        image_size=(32, 32),
        batch_size=1,
        rows_per_file=rows_per_file,
        max_pixels=None,
        max_bytes=None,
        actors_min=1,
        actors_max=1,
        gpus_per_actor=None,
        cpus_per_actor=None,
        mixed_precision=False,
        incremental=True,
        inputs=["synthetic"],
        counts=InputCounts(listed=total, new=total, deleted=len(deleted or [])),
        # The run's rows, as a real run's manifest counts them (readers of the output's settings need them;
        # the manifest file itself is never read once a run has finished).
        manifest=[ManifestPart(name="synthetic", first_row=0, rows=total)],
        deleted=writer.close(),
    )
    params.save(layout)
    summary = {"run_id": run_id, "output": layout.output, "inputs": total, "embedded": total, "errored": 0}
    layout.write_summary(run_id, {**summary, "model_id": model_id, "files": files})
    record_run(layout, IncrementalState.load(layout), params)
    return total


def batches_of(paths: list[str], vectors: np.ndarray, rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
    for start in range(0, len(paths), rows):
        yield paths[start : start + rows], vectors[start : start + rows]


class Realistic:
    """Seeded embedding-like vectors: ``draw(n, rng)`` gives ``n`` of them and their clusters."""

    def __init__(
        self, dim: int, *, rank: int = 256, clusters: int = 1000, noise: float = 0.35, seed: int = 0
    ):
        rng = np.random.default_rng(seed)
        self.dim = dim
        basis, _ = np.linalg.qr(rng.standard_normal((dim, min(rank, dim))).astype(np.float32))
        spectrum = (1.0 / np.arange(1, basis.shape[1] + 1) ** 0.7).astype(np.float32)
        self.basis = (basis * spectrum).T.astype(np.float32)  # [rank, dim]
        self.centres = rng.standard_normal((clusters, basis.shape[1])).astype(np.float32) * 2.0
        self.offset = np.abs(rng.standard_normal(dim)).astype(np.float32) * 0.05
        weights = 1.0 / np.arange(1, clusters + 1) ** 1.0
        self.weights = weights / weights.sum()
        self.noise = noise

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.choice(len(self.centres), size=n, p=self.weights)
        latent = self.centres[labels] + rng.standard_normal((n, self.centres.shape[1]), dtype=np.float32)
        x = latent @ self.basis + self.offset
        x += rng.standard_normal((n, self.dim), dtype=np.float32) * np.float32(self.noise / np.sqrt(self.dim))
        np.maximum(x, 0, out=x)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x, labels
