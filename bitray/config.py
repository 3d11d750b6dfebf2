"""Typed configuration: YAML in, validated by pydantic, errors that name the file and the key.

Each pipeline has one config class (a ``Section``). ``load_config`` reads an optional YAML file, applies
command-line overrides on top, and turns pydantic's validation errors into one ``BitrayError``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bitray.errors import BitrayError

T = TypeVar("T", bound="Section")
MIN_IMAGE_SIZE = 32
"""Smallest model input side BiT is run at."""


class Section(BaseModel):
    """Base of every config block: unknown keys are errors, not silently ignored typos."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    """How to reach object storage. Credentials never live here: they come from the standard chains."""

    s3_endpoint: str | None = None
    """S3-compatible endpoint, e.g. ``http://minio:9000``. Falls back to ``AWS_ENDPOINT_URL_S3`` then
    ``AWS_ENDPOINT_URL`` (pyarrow ignores both, so bitray reads them itself)."""
    s3_region: str | None = None
    """Falls back to ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, then ``us-east-1``."""
    anonymous: bool = False
    """Unsigned requests, for public buckets."""
    read_retry_s: float = Field(120.0, gt=0)
    """How long a failing image read is retried (throttling, 5xx, timeouts, resets) before the run stops
    resumably; such failures never become error rows."""

    def resolved_s3_endpoint(self) -> str | None:
        return (
            self.s3_endpoint
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )

    def resolved_s3_region(self) -> str:
        return (
            self.s3_region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )


IMAGE_EXTENSIONS = (
    *(".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"),
    *(".avif", ".jp2", ".j2k"),  # AVIF and JPEG 2000: Pillow's wheels decode them from 11.3
)


class GateConfig(Section):
    """The quality gate of a scheduled switch to a new model's version (``EmbedConfig.gate``)."""

    labels: str
    """``path,label`` CSV/Parquet or class folders, as ``bitray evaluate --labels``."""
    tolerance: float = Field(0.01, ge=0, le=1)
    """The largest drop of any metric allowed against the current version."""


class EmbedConfig(Section):
    """``bitray embed``: which images, which model, how many actors, where the Parquet goes.

    Every field has a default that runs on a laptop; ``None`` means "decide from the Ray cluster".
    """

    inputs: list[str] = []
    """Input URIs: prefixes (``s3://bucket/photos/``, ``gs://...``, local dirs) or single objects."""
    manifest: str | None = None
    """A text file (local or object store) of input URIs, one per line; ``#`` starts a comment."""
    extensions: list[str] | None = list(IMAGE_EXTENSIONS)
    """Only keys ending in one of these are listed (case-insensitive); ``null`` lists every object."""
    model: str = "bit-s-r101x1"
    """Model spec: ``bit-s-r101x1``, ``hub:<url>``, ``npz:<path>``, ``savedmodel:<dir>``, ``random:<arch>``"""
    image_size: int | tuple[int, int] = 224
    """Model input size, ``224`` or ``[height, width]``; images are resized straight to it (no crop)."""
    batch_size: int = Field(32, ge=1)
    """Images per model call (and per decoded block travelling from the CPU stage to the actors)."""
    rows_per_file: int = Field(8192, ge=1)
    """Images per output Parquet file, the unit committed at once: 8,192 rows are about 64 MB at 2048-d,
    so 100 million images make about 12,200 files."""
    actors_min: int = Field(1, ge=1)
    actors_max: int | None = Field(None, ge=1)
    """Autoscaling pool of embedding actors; default: one per GPU, or half the CPUs' worth on CPU."""
    gpus_per_actor: float | None = Field(None, ge=0)
    """Default: 1 when the cluster has GPUs, else 0."""
    cpus_per_actor: float | None = Field(None, gt=0)
    """Default: 1 on GPU; on CPU a quarter of the cluster's CPUs (1 to 4), TF threads sized to match."""
    mixed_precision: bool = True
    """float16 compute on GPU actors (ignored on CPU, where it is slower)."""
    cpu_precision: Literal["float32", "bfloat16"] = "float32"
    """CPU actors' compute: ``bfloat16`` (about 1.6x faster on an AVX512_BF16 CPU, embeddings close to
    float32's but not equal; README "Precision") needs bfloat16 instructions and an ``npz:``/``random:``
    model; Group Norm statistics and weight standardization stay float32."""
    max_pixels: int | None = Field(None, ge=1)
    """Decompression-bomb limit per image; default: the images module's limit."""
    max_bytes: int | None = Field(256 * 2**20, ge=1)
    """Objects larger than this (by their listed size) are error rows without being read; null: no cap."""
    max_decode_mb: int = Field(1200, ge=1)
    """What decoding one image may allocate, estimated from its header before any pixel is decoded (mode,
    size, the copies of the conversion to RGB; ``bitray.images.DEFAULT_MAX_DECODE_BYTES`` says why 1200):
    larger images are error rows. Each decode task reserves this much memory from Ray."""
    decode: Literal["fast", "exact"] = "fast"
    """``fast``: JPEGs decoded at a reduced DCT scale (never below the model size) and other images
    box-reduced by an integer factor before the antialiased resize, several times faster on photos larger
    than the model input; pixels differ by about 1/255 on average (README, "Decode choice"). ``exact``:
    full-resolution decode, bit-identical to bitray before the fast decode. A run keeps its own choice."""
    output: str = "./bitray-output/embeddings"
    shared_storage: bool = False
    """Local input/output paths are on storage every Ray node mounts (e.g. NFS). Without it, local paths
    are refused on a cluster of more than one node or through a ``ray://`` client."""
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    """Resume or re-run a run by its id; default: a new id, printed at the start."""
    incremental: bool = False
    retry_errors: bool = False
    """Take again the object versions whose latest result under ``output`` is an error row (a read that
    was refused, an image that did not decode; not versions changed or deleted since). Alone, the inputs
    are not listed; with ``incremental``, those still listed at the same version join what is new."""
    """Embed only object versions not yet recorded under ``output`` (new or changed objects)."""
    lock_ttl_s: float = Field(120.0, gt=0)
    """The output lock expires this long after its last heartbeat (a crashed run's lock is taken over)."""
    task: Literal["embed", "classify"] = "embed"
    """``classify`` (``bitray predict``): a fine-tuned classifier's labels instead of embeddings, written to
    ``OUT/predictions/`` with the same exactly-once runs."""
    top_k: int = Field(5, ge=1)
    """``classify``: how many of the most probable labels each prediction row lists."""
    index: str | None = None
    """After the run, add the output's newly finished runs to the nearest-neighbour index at this URI (as
    ``bitray index --embeddings OUTPUT --index URI`` does; built on first use); ``null``: no index."""
    gate: GateConfig | None = None
    """``bitray schedule`` with a ``models:/NAME@ALIAS`` model: a backfilled version becomes current only if
    ``bitray evaluate`` on ``labels`` scores it no worse than the current one by more than ``tolerance``
    (``bitray.backfill``); ``null``: it becomes current when complete."""
    max_concurrent_backfills: int = Field(1, ge=1)
    """``bitray schedule``: a moved model's backfill waits while this many backfill jobs (of any schedule)
    run on the cluster, so the windows are not starved (``bitray.backfill``)."""
    storage: StorageConfig = StorageConfig()

    @field_validator("image_size")
    @classmethod
    def _check_size(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        sizes = (value, value) if isinstance(value, int) else value
        if min(sizes) < MIN_IMAGE_SIZE:
            raise ValueError(f"image sizes below {MIN_IMAGE_SIZE} pixels are too small for BiT")
        return value

    def size_hw(self) -> tuple[int, int]:
        size = self.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class FinetuneConfig(Section):
    """``bitray finetune``: labelled data, model, workers, and the HyperRule with every value overridable.

    ``None`` means "as the HyperRule says" (``bitray.hyperrule``); the resolved values are logged to MLflow.
    """

    data: str = ""
    """Labelled training set: a folder per class (``<root>/<label>/<image>``) or a ``.csv``/``.parquet``
    manifest with ``path,label`` columns; local, ``s3://`` or ``gs://``."""
    validation: str | None = None
    """A separate labelled validation set (same layouts); default: hold out ``val_fraction`` of ``data``."""
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    """Share of ``data`` held out for validation when no ``validation`` set is given (deterministic split)."""
    examples_per_class: int | None = Field(None, ge=1)
    """Few-shot: train on a seeded draw of K images per class (the paper's 1, 2, 5, 10, 25); the
    validation set is unchanged. Batches larger than the set are filled by repeating it."""
    output: str = "./bitray-output/finetune"
    """Where the exported SavedModels go (``<output>/feature_vector``, ``<output>/classifier``)."""
    model: str = "bit-m-r50x1"
    """Model spec to start from: ``bit-m-r50x1``, ``hub:<url>``, ``npz:<path>``, ``savedmodel:<dir>``,
    ``random:<arch>``."""
    workers: int = Field(1, ge=1)
    """Ray Train workers (data-parallel replicas)."""
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    # The HyperRule; None = the rule's value.
    steps: int | None = Field(None, ge=2)
    """Total optimizer steps; the rule's boundaries are scaled to it. Default: by dataset size."""
    boundaries: list[int] | None = None
    """Explicit schedule: end of warmup, the /10 decays, the last step (wins over ``steps``)."""
    batch_size: int = Field(512, ge=1)
    """Global batch per optimizer step, over all workers."""
    micro_batch: int | None = Field(None, ge=1)
    """Global images per forward pass; gradients of ``batch_size / micro_batch`` passes are accumulated."""
    base_lr: float = Field(0.003, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    mixup_alpha: float | None = Field(None, ge=0)
    """MixUp Beta(alpha, alpha), one lambda per batch; default 0.1 from 20k training images, else 0."""
    resolution: str = Field("paper", pattern="^(paper|released)$")
    """Large-image resolution: ``paper`` (448 -> crop 384) or ``released`` (512 -> crop 480)."""
    resize: int | None = Field(None, ge=8)
    crop: int | None = Field(None, ge=8)
    """Training images are resized to ``resize`` then randomly cropped to ``crop``; evaluation resizes
    straight to ``crop``. Default by the median image area of a sample: 160/128 below 96x96, else per
    ``resolution``."""
    resolution_sample: int = Field(256, ge=1)
    """Images whose headers are read (seeded sample) to find the set's median area."""
    cache_decoded: bool | None = None
    """Decode the images once, before training, into Ray's object store; every worker then draws its
    batches from memory (a seeded permutation per epoch, exact on resume). Default: when the decoded set
    is under 1 GiB and half the object store. Otherwise the encoded file bytes are kept (each file is
    read once) and decoded again every epoch by Ray Data tasks, which need a CPU beside the workers'."""
    decode: str = Field("fast", pattern="^(fast|exact)$")
    """``fast``: JPEGs are DCT-scaled at decode to no less than the resize size, then box-reduced and
    resized (``bitray.images.prepare_for_model``); ``exact``: full-resolution decode, one resize."""
    shuffle: str = Field("global", pattern="^(global|local)$")
    """Sets streamed from Ray Data only (``cache_decoded`` false): ``global``: every epoch a fresh Ray
    Data shuffle of the whole set; ``local``: a 1,024-row buffer over the cached order."""
    checkpoint_every: int = Field(100, ge=1)
    eval_every: int = Field(100, ge=1)
    """Steps between validation evaluations; every checkpoint is evaluated too, so that the export can
    be the best checkpoint by validation top-1."""
    export: str = Field("best", pattern="^(best|last)$")
    """Which checkpoint is exported: ``best`` by validation top-1 (the last one without validation)
    or ``last``."""
    max_failures: int = Field(3, ge=-1)
    """Worker failures the run survives (restarting from the last checkpoint); -1: unlimited."""
    seed: int = 0
    """Seed of the train/validation split (augmentation is random on purpose)."""
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    """Run name; re-running with the same name and storage_path resumes it. Default: a new name."""
    storage_path: str = "./bitray-output/ray-runs"
    """Ray Train run storage (checkpoints): local path or ``s3://``."""
    tracking_uri: str | None = None
    """MLflow tracking URI; default ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    experiment: str = "bitray-finetune"
    registered_model: str | None = "auto"
    """Registered model name in the MLflow model registry; ``auto``: ``bitray-<data set name>`` (the
    last part of ``data``); ``null`` skips registration."""
    model_alias: str = "champion"
    """Alias pointed at the new version (MLflow reserves ``latest``) when ``promote`` allows."""
    promote: str = Field("if_better", pattern="^(if_better|always)$")
    """``if_better``: move the alias only when the new version's validation top-1 beats the holder's on
    the same validation set (same digest of its list); ``always``: move it regardless."""
    storage: StorageConfig = StorageConfig()

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"

    def resolved_registered_model(self) -> str | None:
        """The registry name as given; ``auto``: ``bitray-<data set>`` (s3://b/pets/ gives bitray-pets)."""
        if self.registered_model != "auto":
            return self.registered_model
        last = self.data.rstrip("/").rsplit("/", 1)[-1]
        for suffix in (".csv", ".parquet"):
            last = last.removesuffix(suffix)
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.") or "data"
        return f"bitray-{name}"


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing, unreadable or malformed file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BitrayError(f"config file {file} does not exist; check the path given to --config") from None
    except OSError as exc:
        raise BitrayError(f"config file {file} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BitrayError(f"config file {file} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BitrayError(
            f"config file {file} must hold a mapping of keys to values, not {type(data).__name__}"
        )
    return data


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> T:
    """Build ``cls`` from an optional YAML file plus overrides (``None`` values are skipped).

    Overrides are the command-line flags: they win over the file, which wins over the defaults.
    """
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    source = f"config file {path}" if path is not None else "configuration"
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise BitrayError(format_validation_error(source, exc)) from None


def format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"{source} is invalid:"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key; check its spelling against the example configs")
        else:
            lines.append(f"  - {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)
