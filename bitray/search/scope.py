"""Reads an index drives (contact-sheet thumbnails, the SHA-256 of duplicate candidates) stay inside the
embedding output's own inputs, and small.

An index's rows name the objects to read, and anyone who can rewrite the rows file can name any path:
``/etc/passwd`` read with the caller's credentials, ``/dev/zero`` read until memory runs out. So a path
from an index is read only when it lies under an input that a finished run of the output recorded
(``run.json``: its prefixes and single objects, and the lines of its ``--manifest`` file), and never more
than ``max_bytes`` (the largest the runs read with; 256 MB when a run had no cap). Anything else is a
``BitrayError`` that names the path, which a contact sheet shows as an unreadable tile.

The index itself must still come from a trusted writer: loading it runs faiss's deserialiser, native code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from bitray import outputs, storage
from bitray.config import EmbedConfig, StorageConfig
from bitray.errors import BitrayError

DEFAULT_MAX_BYTES: int = EmbedConfig.model_fields["max_bytes"].default


@dataclass(frozen=True)
class IndexReads:
    """Reads confined to ``prefixes`` and ``max_bytes``; ``allow`` adds URIs the caller named itself."""

    output: str
    prefixes: tuple[str, ...]
    max_bytes: int
    storage_config: StorageConfig | None = None
    allowed: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of_output(cls, embeddings: str, storage_config: StorageConfig | None = None) -> IndexReads:
        recorded = outputs.recorded_inputs(embeddings, storage_config)
        prefixes = list(recorded.prefixes)
        for manifest in recorded.manifests:
            prefixes += _manifest_lines(manifest, storage_config)
        return cls(
            output=embeddings,
            prefixes=tuple(sorted({_normal(p) for p in prefixes})),
            max_bytes=recorded.max_bytes or DEFAULT_MAX_BYTES,
            storage_config=storage_config,
        )

    def allow(self, *uris: str) -> IndexReads:
        """The same reads, plus ``uris`` (a query image the user gave on the command line)."""
        return IndexReads(
            self.output, self.prefixes, self.max_bytes, self.storage_config, self.allowed | set(uris)
        )

    def allows(self, uri: str) -> bool:
        if uri in self.allowed:
            return True
        target = _normal(uri)
        return any(_under(target, prefix) for prefix in self.prefixes)

    def read(self, uri: str) -> bytes:
        """The bytes of ``uri``; ``BitrayError`` when it lies outside the output's inputs or is too large."""
        if not self.allows(uri):
            raise BitrayError(
                f"{uri!r} is not under the inputs of {self.output!r}'s runs; refusing to read it "
                "(was the index rewritten?)"
            )
        return storage.read_at_most(uri, self.max_bytes, self.storage_config)


def _manifest_lines(uri: str, storage_config: StorageConfig | None) -> list[str]:
    """The URIs a manifest file lists (as ``bitray.embed.manifest`` reads it); none if it is gone."""
    data = storage.read_if_exists(uri, storage_config)
    if data is None:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _normal(uri: str) -> str:
    """Local paths absolute with ``..`` resolved lexically (symlinks are the input's own business)."""
    if storage.is_remote(uri):
        return "gs://" + uri[len("gcs://") :] if uri[:6].lower() == "gcs://" else uri
    return os.path.normpath(storage.local_path(uri))


def _under(uri: str, prefix: str) -> bool:
    """``uri`` is ``prefix`` or lies below it, as a listing of ``prefix`` would find it (``a/b`` does not
    hold ``a/bc``)."""
    if prefix.endswith("/"):
        return uri.startswith(prefix)
    return uri == prefix or uri.startswith(prefix + "/")
