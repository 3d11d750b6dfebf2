"""The embedding pipeline: list -> read, decode, resize (CPU tasks) -> BiT actors -> Parquet, exactly once.

The unit of work is a *shard*: ``batch_size`` consecutive inputs of the run's manifest. A CPU task reads
and decodes one shard; an actor from an autoscaling pool runs the model on it as one batch and commits it
(data files, then a commit record; see ``bitray.ledger``). Nothing but small counts comes back to the
driver, so the driver's memory does not grow with the number of images.

Why not ``ray.data.read_binary_files``: it fails the whole job when one object cannot be read (deleted
after listing, permission denied), and its rows carry no object version. Reading each object in our own
task gives a per-image error record (stage ``read``) instead, and keeps the (path, version) pairing of
the manifest that exactly-once and incremental runs depend on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from bitray import ray_session, storage
from bitray.config import EmbedConfig, StorageConfig
from bitray.errors import BitrayError
from bitray.incremental import RunLock, recorded_versions, select_new
from bitray.ledger import ERRORS_SCHEMA, RunLayout, embeddings_schema
from bitray.storage import ObjectInfo

log = logging.getLogger(__name__)

MAX_INPUT_BLOCKS = 2000
"""Shards are spread over at most this many input blocks (one block per shard for smaller runs)."""


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
    storage_config = _resolved_storage(config.storage)
    output = config.output.rstrip("/")
    if not storage.is_remote(output):
        output = str(storage.local_path(output))  # Ray workers may run in another directory
    layout = RunLayout(output, storage_config)
    run_id = config.run_id or new_run_id()
    print(f"bitray: run {run_id} -> {layout.output}", flush=True)
    with RunLock(layout, run_id, ttl_s=config.lock_ttl_s):
        others = [r for r in layout.run_ids() if r != run_id and layout.has_manifest(r)]
        begun = layout.has_manifest(run_id)
        if config.incremental:
            for other in others:
                if not layout.is_finished(other):
                    print(f"bitray: finishing the interrupted run {other} first", flush=True)
                    _execute(layout, other, address, time.monotonic())
        elif others and not begun:
            raise BitrayError(
                f"output {layout.output} already holds run(s) {', '.join(others[:3])}; resume one with "
                f"--run-id {others[-1]}, add only new images with --incremental, or choose another --output"
            )
        if not begun:
            _start_run(config, layout, run_id)
        elif not layout.is_finished(run_id):
            params = layout.read_params(run_id)
            print(
                f"bitray: resuming run {run_id} with the inputs and settings it started with "
                f"(model {params['model']}, image size {params['image_size']})",
                flush=True,
            )
        return _execute(layout, run_id, address, started)


def _start_run(config: EmbedConfig, layout: RunLayout, run_id: str) -> None:
    """List the inputs (on the driver, before any Ray work) and write the run's manifest."""
    listed = list_inputs(config, layout.storage)
    if not listed:
        where = ", ".join(config.inputs) or config.manifest
        raise BitrayError(
            f"no images found under {where} (extensions {', '.join(config.extensions or ['any'])}); "
            "check the input prefix and the extensions filter"
        )
    unchanged = 0
    if config.incremental:
        todo = select_new(listed, recorded_versions(layout))
        unchanged = len(listed) - len(todo)
    else:
        todo = listed
    params = {
        "model": config.model,
        "image_size": list(config.size_hw()),
        "batch_size": config.batch_size,
        "max_pixels": config.max_pixels,
        "unchanged": unchanged,
        "actors_min": config.actors_min,
        "actors_max": config.actors_max,
        "gpus_per_actor": config.gpus_per_actor,
        "cpus_per_actor": config.cpus_per_actor,
        "mixed_precision": config.mixed_precision,
    }
    layout.write_run(run_id, todo, config.batch_size, params)
    print(
        f"bitray: {len(todo)} image(s) to embed" + (f", {unchanged} unchanged" if unchanged else ""),
        flush=True,
    )


def list_inputs(config: EmbedConfig, storage_config: StorageConfig) -> list[ObjectInfo]:
    """Every input object once, in listing order (overlapping inputs are de-duplicated by path)."""
    uris = list(config.inputs)
    if config.manifest:
        text = storage.read_bytes(config.manifest, storage_config).decode("utf-8")
        uris += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not uris:
        raise BitrayError("no input given; pass --input URI (or inputs/manifest in the config file)")
    seen: dict[str, ObjectInfo] = {}
    for uri in uris:
        for obj in storage.list_objects(uri, extensions=config.extensions, storage=storage_config):
            seen.setdefault(obj.uri, obj)
    return list(seen.values())


def _execute(layout: RunLayout, run_id: str, address: str | None, started: float) -> RunSummary:
    """Embed the shards of ``run_id`` that are not committed yet, then write and return the summary."""
    if layout.is_finished(run_id):
        summary = RunSummary(
            **{**layout.read_summary(run_id), "seconds": 0.0, "images_per_s": 0.0, "processed": 0}
        )
        print("bitray: run already finished; nothing to do", flush=True)
        return summary
    manifest = layout.read_manifest(run_id)
    params = layout.read_params(run_id)
    commits = layout.commits(run_id)
    shards = _pending_shards(manifest, set(commits))
    processed = 0
    if shards:
        try:
            processed = _run_pipeline(layout, run_id, shards, params, address)
        except BitrayError as exc:
            if commits or layout.commits(run_id):
                raise BitrayError(f"{exc}; fix it, then finish the run with --run-id {run_id}") from None
            layout.discard_run(run_id, manifest)  # e.g. a model that cannot load: let a fixed run start anew
            raise BitrayError(f"{exc}; nothing of run {run_id} was kept") from None
        commits = layout.commits(run_id)
    embedded = sum(c["embedded"] for c in commits.values())
    errored = sum(c["errored"] for c in commits.values())
    if embedded + errored != manifest.num_rows:
        raise BitrayError(
            f"run {run_id} accounted for {embedded + errored} of {manifest.num_rows} inputs; "
            f"run it again with --run-id {run_id} to finish it"
        )
    models = sorted({c["model"] for c in commits.values()})
    seconds = time.monotonic() - started
    summary = RunSummary(
        run_id=run_id,
        output=layout.output,
        inputs=manifest.num_rows,
        embedded=embedded,
        errored=errored,
        model_id=", ".join(models) if models else None,
        seconds=round(seconds, 3),
        images_per_s=round(processed / seconds, 3) if seconds > 0 else 0.0,
        processed=processed,
        unchanged=int(params.get("unchanged", 0)),
    )
    layout.write_summary(run_id, summary.to_dict())
    return summary


def _pending_shards(manifest: pa.Table, committed: set[int]) -> list[dict[str, Any]]:
    """One row per uncommitted shard: its id and its inputs as JSON (path, etag, size, mtime_ns)."""
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for row in manifest.select(["shard", "path", "etag", "size", "mtime_ns"]).to_pylist():
        shard = row.pop("shard")
        if shard not in committed:
            by_shard.setdefault(shard, []).append(row)
    return [{"shard": shard, "inputs": json.dumps(rows)} for shard, rows in sorted(by_shard.items())]


def _run_pipeline(
    layout: RunLayout, run_id: str, shards: list[dict[str, Any]], params: dict[str, Any], address: str | None
) -> int:
    import ray

    ray_session.connect(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bars = True  # Ray Jobs hides them otherwise
    resources = ray.cluster_resources()
    gpus, cpus, threads, actors_max = _actor_resources(params, resources)
    size = tuple(params["image_size"])
    max_pixels = params.get("max_pixels")
    ds = ray.data.from_items(shards, override_num_blocks=min(len(shards), MAX_INPUT_BLOCKS))
    ds = ds.map_batches(
        decode_shards,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"storage_config": layout.storage, "size": size, "max_pixels": max_pixels},
        # Reserving the memory a decoded shard needs also keeps this a separate operator: Ray would
        # otherwise fuse it into the actors, and decoding would stall the model instead of overlapping it.
        num_cpus=1,
        memory=_decode_memory(params["batch_size"], size),
    )
    ds = ds.map_batches(
        EmbedActor,
        batch_size=1,
        batch_format="pyarrow",
        fn_constructor_kwargs={
            "model_spec": params["model"],
            "size": size,
            "layout": layout,
            "run_id": run_id,
            "threads": threads,
            "mixed_precision": bool(params.get("mixed_precision")) and gpus > 0,
        },
        compute=ray.data.ActorPoolStrategy(
            min_size=min(int(params.get("actors_min") or 1), actors_max), max_size=actors_max
        ),
        num_gpus=gpus,
        num_cpus=cpus,
    )
    processed = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            processed += sum(batch.column("embedded").to_pylist()) + sum(batch.column("errored").to_pylist())
    except Exception as exc:
        cause = _bitray_cause(exc)
        if cause is not None:
            raise BitrayError(f"the embedding pipeline stopped: {cause}") from None
        raise
    return processed


def _actor_resources(
    params: dict[str, Any], resources: dict[str, float]
) -> tuple[float, float, int, int]:
    """(GPUs per actor, CPUs reserved per actor, TF threads per actor, most actors).

    From the run's settings, else from the cluster. On CPU-only clusters the default actor reserves half
    the cores it computes on: the other half stays schedulable for the decode tasks, which are light next
    to a BiT forward pass and share those cores, instead of leaving them idle (on 2 cores: one actor,
    1 CPU reserved, 2 TF threads). An explicit ``cpus_per_actor`` is used as it is for both.
    """
    cluster_gpus = resources.get("GPU", 0)
    cluster_cpus = resources.get("CPU", 1)
    gpus = params.get("gpus_per_actor")
    gpus = (1.0 if cluster_gpus else 0.0) if gpus is None else float(gpus)
    cpus = params.get("cpus_per_actor")
    threads = None if cpus is None else max(1, int(cpus))
    if cpus is None:
        cpus = 1.0 if gpus else float(min(4, max(1, int(cluster_cpus // 4))))
    if threads is None:
        threads = max(1, int(cpus)) if gpus else 2 * max(1, int(cpus))
    actors_max = params.get("actors_max")
    if actors_max is None:
        actors_max = int(cluster_gpus // gpus) if gpus else int(cluster_cpus // (2 * cpus))
    return gpus, float(cpus), threads, max(1, int(actors_max))


def _decode_memory(batch_size: int, size: tuple[int, int]) -> int:
    """Bytes a decode task may hold: the shard's float32 pixels twice over, plus one large decoded photo."""
    return 2 * batch_size * size[0] * size[1] * 3 * 4 + 256 * 2**20


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
        if isinstance(current, BitrayError):
            return str(current)
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    found = re.findall(r"^bitray\.[\w.]*Error: (.+)$", str(exc), flags=re.MULTILINE)
    return found[-1] if found else None


def _resolved_storage(config: StorageConfig) -> StorageConfig:
    """Pin the endpoint and region from the driver's environment: Ray workers may not share it."""
    return config.model_copy(
        update={"s3_endpoint": config.resolved_s3_endpoint(), "s3_region": config.resolved_s3_region()}
    )


# -- the CPU stage ------------------------------------------------------------------------------------------


def decode_shards(
    batch: pa.Table, *, storage_config: StorageConfig, size: tuple[int, int], max_pixels: int | None
) -> pa.Table:
    """Read and decode each shard's images; every input ends as one pixel row or one error record."""
    from bitray.images import DEFAULT_MAX_PIXELS, decode_image, resize_for_model

    limit = max_pixels or DEFAULT_MAX_PIXELS
    out: dict[str, list] = {"shard": [], "pixels": [], "images": [], "errors": []}
    for shard, inputs in zip(
        batch.column("shard").to_pylist(), batch.column("inputs").to_pylist(), strict=True
    ):
        pixels, images, errors = [], [], []
        for record in json.loads(inputs):
            try:
                data = read_listed(record, storage_config)
            except Exception as exc:
                errors.append({**record, "stage": "read", "error": _describe(exc)})
                continue
            try:
                decoded = decode_image(data, max_pixels=limit)
                pixels.append(resize_for_model(decoded.pixels, size))
            except Exception as exc:
                errors.append({**record, "stage": "decode", "error": _describe(exc)})
                continue
            images.append({**record, "width": decoded.width, "height": decoded.height})
        stacked = np.stack(pixels) if pixels else np.zeros((0, *size, 3), np.float32)
        out["shard"].append(shard)
        out["pixels"].append(stacked.astype(np.float32, copy=False).tobytes())
        out["images"].append(json.dumps(images))
        out["errors"].append(json.dumps(errors))
    return pa.table(
        {
            "shard": pa.array(out["shard"], pa.int64()),
            "pixels": pa.array(out["pixels"], pa.large_binary()),
            "images": pa.array(out["images"], pa.string()),
            "errors": pa.array(out["errors"], pa.string()),
        }
    )


class ObjectChanged(BitrayError):
    """The object is no longer the version the run listed."""


def read_listed(record: dict[str, Any], storage_config: StorageConfig) -> bytes:
    """The bytes of the object version the manifest lists, or ``ObjectChanged``.

    Without this check a row's etag/size/mtime could describe other bytes than the ones embedded. The
    version that changed is recorded as a read error; an incremental run embeds the new version.
    """
    path = record["path"]
    if storage.scheme_of(path) == "s3" and record.get("etag"):
        from botocore.exceptions import ClientError

        bucket, key = storage.split_bucket(path)
        client = _s3_client(storage_config.s3_endpoint, storage_config.s3_region, storage_config.anonymous)
        with storage.s3_errors(path, storage_config):
            try:
                return client.get_object(Bucket=bucket, Key=key, IfMatch=record["etag"])["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code", "") not in ("PreconditionFailed", "412"):
                    raise
        raise ObjectChanged(f"{path} changed after it was listed (listed etag {record['etag']})")
    data = storage.read_bytes(path, storage_config)
    if storage.scheme_of(path) == "file":
        stat = storage.local_path(path).stat()
        if (len(data), stat.st_size, stat.st_mtime_ns) != (
            record["size"],
            record["size"],
            record["mtime_ns"],
        ):
            raise ObjectChanged(f"{path} changed after it was listed")
    return data


@functools.lru_cache(maxsize=4)
def _s3_client(endpoint: str | None, region: str | None, anonymous: bool):  # noqa: ANN202
    return storage.s3_client(StorageConfig(s3_endpoint=endpoint, s3_region=region, anonymous=anonymous))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# -- the model stage -----------------------------------------------------------------------------------------


class EmbedActor:
    """One model per actor, loaded once; embeds a decoded shard and commits it to the output."""

    def __init__(
        self,
        *,
        model_spec: str,
        size: tuple[int, int],
        layout: RunLayout,
        run_id: str,
        threads: int,
        mixed_precision: bool,
    ) -> None:
        configure_tensorflow(threads=threads, mixed_precision=mixed_precision)
        from bitray.model import load_model

        self.loaded = load_model(model_spec, storage=layout.storage)
        self.forward = self.loaded.inference_function()
        self.size = size
        self.layout = layout
        self.run_id = run_id
        self.schema = embeddings_schema(self.loaded.feature_dim)

    def __call__(self, batch: pa.Table) -> pa.Table:
        results: dict[str, list] = {"shard": [], "embedded": [], "errored": []}
        for row in batch.to_pylist():
            images, errors = json.loads(row["images"]), json.loads(row["errors"])
            features = self.embed(row["pixels"], len(images))
            finite = np.isfinite(features).all(axis=1)
            errors += [
                {**image, "stage": "embed", "error": "ValueError: the model gave non-finite features"}
                for image, ok in zip(images, finite, strict=True)
                if not ok
            ]
            kept = [image for image, ok in zip(images, finite, strict=True) if ok]
            record = self.layout.commit_shard(
                self.run_id,
                row["shard"],
                self._embeddings_table(kept, features[finite]),
                self._errors_table(errors),
                self.loaded.model_id,
            )
            results["shard"].append(row["shard"])
            results["embedded"].append(record["embedded"])
            results["errored"].append(record["errored"])
        return pa.table(results)

    def embed(self, pixels: bytes, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros((0, self.loaded.feature_dim), np.float32)
        images = np.frombuffer(pixels, np.float32).reshape(count, *self.size, 3)
        return np.asarray(self.forward(images), dtype=np.float32)

    def _embeddings_table(self, images: list[dict[str, Any]], features: np.ndarray) -> pa.Table:
        dim = self.loaded.feature_dim
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), pa.float32()), dim)
        return pa.table(
            {
                "path": [i["path"] for i in images],
                "embedding": embedding,
                "model": [self.loaded.model_id] * len(images),
                "width": [i["width"] for i in images],
                "height": [i["height"] for i in images],
                "etag": [i["etag"] for i in images],
                "size": [i["size"] for i in images],
                "mtime": [i["mtime_ns"] for i in images],
                "run_id": [self.run_id] * len(images),
            },
            schema=self.schema,
        )

    def _errors_table(self, errors: list[dict[str, Any]]) -> pa.Table:
        columns = ("path", "stage", "error", "etag", "size")
        data: dict[str, list] = {name: [e[name] for e in errors] for name in columns}
        data["mtime"] = [e["mtime_ns"] for e in errors]
        data["run_id"] = [self.run_id] * len(errors)
        return pa.table(data, schema=ERRORS_SCHEMA)


def configure_tensorflow(*, threads: int, mixed_precision: bool) -> None:
    """Size TF's thread pools (not Ray's CPU reservation), grow GPU memory on demand, float16 on GPU."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TF already initialised in this worker process
        log.warning("TensorFlow was initialised before the actor could size its thread pools")
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):  # already initialised: growth was set by then or cannot be
            tf.config.experimental.set_memory_growth(gpu, True)
    if mixed_precision and gpus:
        import tf_keras

        tf_keras.mixed_precision.set_global_policy("mixed_float16")
