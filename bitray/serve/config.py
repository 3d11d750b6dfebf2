"""``ServeConfig``: what ``bitray serve`` serves and within which limits (YAML in, flags on top).

The same object is the ``args`` of the Serve application builder (``bitray.serve.app:build``), so a
``serve deploy`` config written by ``bitray serve --write-config`` carries exactly these keys.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from bitray.config import MIN_IMAGE_SIZE, Section, StorageConfig
from bitray.images import DEFAULT_MAX_DECODE_MB, DEFAULT_MAX_PIXELS

LOOPBACK = "127.0.0.1"


class ServeConfig(Section):
    """``bitray serve``: the models, the index, the HTTP endpoint and the limits on each request."""

    model: str | None = None
    """Embedding model spec (``bitray.model``); default: the index's own model (``--index``)."""
    classifier: str | None = None
    """A fine-tuned classifier: ``savedmodel:DIR/classifier`` or ``models:/NAME@ALIAS``.
    null: no /classify."""
    index: str | None = None
    """A bitray index (``bitray index``), an output or a collection root (``bitray outputs``) for /search and
    /thumbnail; null: neither is served. The app follows the root's switches, models included."""
    follow_s: float = Field(5.0, gt=0, le=3600)
    """How often the app looks for a new index generation or a switch of the collection's version."""
    host: str = LOOPBACK
    """The address the HTTP proxy binds; anything but loopback exposes the API (a warning says so)."""
    port: int = Field(8000, ge=1, le=65535)
    replicas_min: int = Field(1, ge=1)
    replicas_max: int = Field(2, ge=1)
    """Autoscaling bounds of each model deployment (and of the ingress)."""
    batch_size: int = Field(16, ge=1)
    """Largest batch a model replica runs at once (``@serve.batch``); see ``bitray.serve.models``."""
    batch_wait_s: float = Field(0.005, ge=0, le=1)
    """How long a model replica waits for a batch to fill once its first request is in."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests one ingress replica holds at once (decoding, waiting for a model); more wait in the proxy."""
    gpus_per_replica: float | None = Field(None, ge=0)
    """GPUs per model replica; default: 1 when the cluster has (or can add) GPUs, as the embedding actors."""
    image_size: int | None = Field(None, ge=MIN_IMAGE_SIZE)
    """Model input side when there is no index; default: the model's own (a fine-tune's crop) or 224.
    With an index, its recorded size is used so that online vectors equal the indexed ones."""
    decode: Literal["fast", "exact"] | None = None
    """Decode choice without an index (default fast); with one, the index's recorded choice."""
    max_bytes: int = Field(32 * 2**20, ge=1)
    """Largest request body read (bytes); larger ones are refused from Content-Length or while streaming."""
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    max_decode_mb: int = Field(DEFAULT_MAX_DECODE_MB, ge=1)
    k_max: int = Field(100, ge=1)
    """Most neighbours or labels one request may ask for (``k`` is capped to it)."""
    k_default: int = Field(10, ge=1)
    thumbnail_px: int = Field(256, ge=16, le=1024)
    storage: StorageConfig = StorageConfig()

    def is_loopback(self) -> bool:
        return self.host in (LOOPBACK, "localhost", "::1")
