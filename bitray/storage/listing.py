"""Listing: every object under a prefix, streamed in code-point order of the URIs whatever the scheme.

S3 through boto3's paginator (pages of 1,000 keys, with the ETags pyarrow's ``FileInfo`` lacks), GCS through
google-cloud-storage's ``list_blobs`` (page by page; GCS, like S3, lists in UTF-8 byte order; the object's
generation is its ``etag``, the version reads are conditional on), local
directories by a walk that sorts a directory as ``name + "/"``. The walk enters each directory once (by
device and inode) and follows a symbolic link to a directory only when its target lies inside the input
root, so ``ln -s . again`` cannot loop and ``ln -s .. up`` cannot pull in the parent tree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.storage.clients import gcs_client, s3_client
from bitray.storage.errors import s3_errors
from bitray.storage.uri import ObjectInfo, local_path, scheme_of, split_bucket


def matches(name: str, extensions: Iterable[str] | None) -> bool:
    if extensions is None:
        return True
    lower = name.lower()
    return any(
        lower.endswith(ext.lower() if ext.startswith(".") else f".{ext.lower()}") for ext in extensions
    )


def list_objects(
    uri: str,
    *,
    extensions: Iterable[str] | None = None,
    storage: StorageConfig | None = None,
) -> Iterator[ObjectInfo]:
    """Stream every object under ``uri`` (a prefix or a single object), without reading any bytes.

    Directory markers (keys ending in ``/``) are not objects and are never yielded. Raises
    ``BitrayError`` for a missing bucket or path, refused credentials or an unreachable endpoint.
    """
    exts = tuple(extensions) if extensions is not None else None
    scheme = scheme_of(uri)
    if scheme == "s3":
        yield from _list_s3(uri, exts, storage or StorageConfig())
    elif scheme == "file":
        yield from _list_local(uri, exts)
    else:
        yield from _list_gs(uri, exts, storage or StorageConfig())


def _list_local(uri: str, exts: tuple[str, ...] | None) -> Iterator[ObjectInfo]:
    root = local_path(uri)
    if root.is_file():
        st = root.stat()
        yield ObjectInfo(str(root), st.st_size, st.st_mtime_ns)
        return
    if not root.is_dir():
        raise BitrayError(f"input {uri!r} does not exist; check the path")
    yield from _Walk(root, exts).walk(root)


class _Walk:
    """Depth-first in code-point order of the full path, the order S3 lists keys in: a directory sorts as
    ``name + "/"``, so ``a-c.jpg`` comes before ``a/b.jpg`` (``-`` < ``/``) and ``a0.jpg`` after it.

    Every directory is entered at most once, by (device, inode): a link to a directory already walked (or
    a bind mount of one) is skipped, and the first path in listing order is the one its files get. A link
    to a directory whose real path is outside the root's is never followed."""

    def __init__(self, root: Path, exts: tuple[str, ...] | None) -> None:
        self.real_root = os.path.realpath(root)
        self.exts = exts
        self.seen: set[tuple[int, int]] = set()

    def walk(self, directory: Path) -> Iterator[ObjectInfo]:
        try:
            st = directory.stat()
        except OSError:
            return  # removed or unreadable while listing
        if (st.st_dev, st.st_ino) in self.seen:
            return
        self.seen.add((st.st_dev, st.st_ino))
        try:
            entries = [(entry, self._kind(entry)) for entry in os.scandir(directory)]
        except OSError:
            return
        entries.sort(key=lambda item: item[0].name + "/" if item[1] != "file" else item[0].name)
        for entry, kind in entries:
            if kind == "dir":
                yield from self.walk(Path(entry.path))
            elif kind == "file" and matches(entry.name, self.exts):
                try:
                    st = entry.stat()
                except OSError:
                    continue  # removed while listing: not an input of this run
                yield ObjectInfo(entry.path, st.st_size, st.st_mtime_ns)

    def _kind(self, entry: os.DirEntry) -> str | None:
        """``dir`` (a directory, or a link to one inside the root), ``file``, or None: skipped (a link to a
        directory outside the root)."""
        try:
            if not entry.is_dir(follow_symlinks=True):
                return "file"
            if not entry.is_symlink():
                return "dir"
        except OSError:
            return "file"  # vanished or unreadable: its stat below decides
        target = os.path.realpath(entry.path)
        inside = target == self.real_root or target.startswith(self.real_root.rstrip(os.sep) + os.sep)
        return "dir" if inside else None


def _list_s3(uri: str, exts: tuple[str, ...] | None, storage: StorageConfig) -> Iterator[ObjectInfo]:
    bucket, prefix = split_bucket(uri)
    client = s3_client(storage)
    paginator = client.get_paginator("list_objects_v2")
    with s3_errors(uri, storage):
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/") or not matches(key, exts):
                    continue
                if prefix and key != prefix and not prefix.endswith("/") and not key.startswith(prefix + "/"):
                    continue  # prefix "a/b" must not match "a/bc/x.jpg"
                yield ObjectInfo(
                    uri=f"s3://{bucket}/{key}",
                    size=int(obj["Size"]),
                    mtime_ns=int(obj["LastModified"].timestamp() * 1e9),
                    etag=str(obj.get("ETag", "")).strip('"') or None,
                )


def _list_gs(uri: str, exts: tuple[str, ...] | None, storage: StorageConfig) -> Iterator[ObjectInfo]:
    """GCS lists names in UTF-8 byte order, like S3: stream it page by page (1,000 per request)."""
    from google.api_core import exceptions as gexc

    bucket, prefix = split_bucket(uri)
    client = gcs_client(storage)
    try:
        for blob in client.list_blobs(bucket, prefix=prefix, page_size=1000):
            name = blob.name
            if name.endswith("/") or not matches(name, exts):
                continue
            if prefix and name != prefix and not prefix.endswith("/") and not name.startswith(prefix + "/"):
                continue  # prefix "a/b" must not match "a/bc/x.jpg"
            generation = getattr(blob, "generation", None)  # the version, as S3's ETag is
            yield ObjectInfo(
                f"gs://{bucket}/{name}",
                int(blob.size or 0),
                _ns(blob.updated),
                etag=str(generation) if generation else None,
            )
    except gexc.NotFound:
        raise BitrayError(f"bucket {bucket!r} of {uri!r} does not exist") from None
    except (gexc.Forbidden, gexc.Unauthorized) as exc:
        raise BitrayError(
            f"access to {uri!r} was refused ({exc.code}); check the Google credentials "
            "(GOOGLE_APPLICATION_CREDENTIALS or the workload identity)"
        ) from None
    except gexc.GoogleAPIError as exc:
        raise BitrayError(f"cannot list {uri!r}: {exc}") from None


def _ns(moment) -> int | None:  # noqa: ANN001 - a datetime or None
    """A timezone-aware datetime as integer nanoseconds since the epoch, without float rounding."""
    if moment is None:
        return None
    import datetime as dt

    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
