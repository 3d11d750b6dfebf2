"""Object URIs (``s3://``, ``gs://``, local paths) -> scheme, bucket and key; ``ObjectInfo``, a listed object.

Keys are kept exactly as stored. An ``s3://`` or ``gs://`` URI is split at the first ``/`` after the
bucket and never parsed as a URL, so ``s3://b/photos/summer #1.jpg`` names the key ``photos/summer #1.jpg``
(``#``, ``?``, ``%``, ``+``, spaces, unicode, ``//`` and trailing dots included); a local path is used as
written (a ``file://`` prefix is dropped, nothing is percent-decoded).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bitray.errors import BitrayError


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: where it is and which version of it was seen."""

    uri: str
    size: int
    mtime_ns: int | None = None
    etag: str | None = None

    @property
    def version(self) -> str:
        """A string that changes whenever the object's content may have changed."""
        if self.etag:
            return f"etag:{self.etag}"
        return f"size:{self.size}:mtime_ns:{self.mtime_ns}"


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(uri: str) -> str:
    """``s3``, ``gs`` or ``file`` (``gcs://`` is ``gs``; a path without ``scheme://`` is local)."""
    match = _SCHEME.match(uri)
    if match is None:
        return "file"
    scheme = match.group(1).lower()
    if scheme == "gcs":
        return "gs"
    if scheme in ("s3", "gs", "file"):
        return scheme
    raise BitrayError(f"{uri!r}: unsupported storage scheme {scheme!r}; use s3://, gs:// or a local path")


def is_remote(uri: str) -> bool:
    return scheme_of(uri) != "file"


def local_path(uri: str) -> Path:
    """The absolute local path of a ``file://`` URI or plain path, with the name exactly as written."""
    raw = uri[len("file://") :] if uri[:7].lower() == "file://" else uri
    return Path(raw).expanduser().absolute()


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path with ``/`` (no URL quoting: names stay as given)."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def split_bucket(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``): the key is everything after the bucket's ``/``, as is."""
    match = _SCHEME.match(uri)
    rest = uri[match.end() :] if match else uri
    bucket, _, key = rest.partition("/")
    if not bucket:
        scheme = match.group(1) if match else "s3"
        raise BitrayError(f"{uri!r} names no bucket; write it as {scheme}://BUCKET/PREFIX")
    return bucket, key
