"""Whole files and objects by URI: read, write, test, copy to local, delete, list names, move.

pyarrow refuses S3 keys with empty path components (``a//b``), so whole-object reads, writes, deletes and
existence checks on S3 go through boto3, which sends any key as it is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from bitray.config import StorageConfig
from bitray.errors import BitrayError
from bitray.storage.clients import filesystem_for, shared_s3_client
from bitray.storage.conditional import GcsConditionalObject, get_with_etag, put_if_none_match
from bitray.storage.deadline import s3_request, seconds_left
from bitray.storage.errors import error_code, s3_errors
from bitray.storage.uri import is_remote, local_path, scheme_of, split_bucket


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    """A whole object or file. S3 keys go through boto3, so any key is read as it is stored."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        with s3_errors(uri, storage):
            found = get_with_etag(uri, client=shared_s3_client(storage))
        if found is None:
            raise BitrayError(f"{uri!r} does not exist")
        return found[0]
    fs, path = filesystem_for(uri, storage)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise BitrayError(f"{uri!r} does not exist") from None
    except OSError as exc:
        raise BitrayError(f"cannot read {uri!r}: {exc}") from None


def read_if_exists(uri: str, storage: StorageConfig | None = None) -> bytes | None:
    """A whole object or file, or None when it does not exist: one request either way."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        with s3_errors(uri, storage):
            found = get_with_etag(uri, client=shared_s3_client(storage))
        return None if found is None else found[0]
    fs, path = filesystem_for(uri, storage)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BitrayError(f"cannot read {uri!r}: {exc}") from None


def write_bytes(
    uri: str, data: bytes, storage: StorageConfig | None = None, *, deadline: float | None = None
) -> None:
    """Write a whole object. Local files are written to a temporary name and renamed, so readers never
    see a partial file; object stores make a single PUT visible atomically by themselves. S3 keys go
    through boto3, so any key is written as given. ``deadline``: S3 requests end by it
    (``bitray.storage.deadline``)."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        bucket, key = split_bucket(uri)
        with s3_errors(uri, storage):
            put = lambda client: client.put_object(Bucket=bucket, Key=key, Body=data)  # noqa: E731
            s3_request(storage, deadline, put, f"PUT {uri}")
        return
    fs, path = filesystem_for(uri, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        with _local_temporary(Path(path), data) as tmp:
            os.replace(tmp, path)
        return
    try:
        with fs.open_output_stream(path) as out:
            out.write(data)
    except OSError as exc:
        raise BitrayError(f"cannot write {uri!r}: {exc}") from None


def create_bytes(
    uri: str, data: bytes, storage: StorageConfig | None = None, *, deadline: float | None = None
) -> bool:
    """Create a whole object only if nothing exists under its name; False when something else does.

    S3: ``If-None-Match: *``; GCS: ``if_generation_match=0``; local: a hard link of a complete temporary
    file, which fails if the name exists. Each is atomic where the object lives, so of two writers of one
    name exactly one creates it. A retried request whose first try did land finds its own bytes: True.
    """
    scheme = scheme_of(uri)
    if scheme == "s3":
        storage = storage or StorageConfig()
        with s3_errors(uri, storage):
            created = s3_request(
                storage, deadline, lambda client: put_if_none_match(uri, data, client=client), f"PUT {uri}"
            )
            if created is not None:
                return True
            found = s3_request(
                storage, deadline, lambda client: get_with_etag(uri, client=client), f"GET {uri}"
            )
        return found is not None and found[0] == data
    if scheme == "gs":
        from bitray.storage.clients import gcs_client

        bucket, _ = split_bucket(uri)
        target = GcsConditionalObject(uri, gcs_client(storage).bucket(bucket), seconds_left(deadline) or 60.0)
        if target.create(data) is not None:
            return True
        found = target.read()
        return found is not None and found[0] == data
    path = local_path(uri)
    with _local_temporary(path, data) as tmp:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_bytes() == data
    return True


class _local_temporary:  # noqa: N801 - a context manager that reads like a function
    """A complete temporary file beside ``target`` holding ``data``; removed on exit."""

    def __init__(self, target: Path, data: bytes) -> None:
        self.target = target
        self.data = data

    def __enter__(self) -> str:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(self.data)
        except BaseException:
            Path(self.tmp).unlink(missing_ok=True)
            raise
        return self.tmp

    def __exit__(self, *exc: object) -> None:
        Path(self.tmp).unlink(missing_ok=True)


def exists(uri: str, storage: StorageConfig | None = None, *, deadline: float | None = None) -> bool:
    if scheme_of(uri) == "s3":
        from botocore.exceptions import ClientError

        storage = storage or StorageConfig()
        bucket, key = split_bucket(uri)
        with s3_errors(uri, storage):
            try:
                s3_request(storage, deadline, lambda c: c.head_object(Bucket=bucket, Key=key), f"HEAD {uri}")
            except ClientError as exc:
                if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                    return _s3_prefix_exists(uri, storage, deadline)
                raise
        return True
    fs, path = filesystem_for(uri, storage)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise BitrayError(f"cannot reach {uri!r}: {exc}") from None


def _s3_prefix_exists(uri: str, storage: StorageConfig, deadline: float | None = None) -> bool:
    """Whether ``uri`` is a "directory": some key starts with ``uri/`` (pyarrow's view, kept)."""
    bucket, key = split_bucket(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    page = s3_request(
        storage,
        deadline,
        lambda client: client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1),
        f"LIST {uri}",
    )
    return bool(page.get("KeyCount") or page.get("Contents"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("BITRAY_CACHE_DIR", Path.home() / ".cache" / "bitray"))


def copy_to_local(uri: str, storage: StorageConfig | None = None, cache_dir: Path | None = None) -> Path:
    """A local copy of a remote file or directory (e.g. a SavedModel), cached by URI.

    Local inputs are returned as they are. The copy is made under a temporary name and renamed when
    complete, so an interrupted download is never mistaken for a cached one.
    """
    if not is_remote(uri):
        path = local_path(uri)
        if not path.exists():
            raise BitrayError(f"{uri!r} does not exist; check the path")
        return path
    fs, src = filesystem_for(uri, storage)
    try:
        info = fs.get_file_info(src)
    except OSError as exc:
        raise BitrayError(f"cannot reach {uri!r}: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise BitrayError(f"{uri!r} does not exist; check the bucket and key")
    cache = (cache_dir or default_cache_dir()) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache / Path(src).name
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache))
    try:
        # copy_files copies a single file or a whole directory tree alike
        pafs.copy_files(
            src,
            str(staging / target.name),
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        os.replace(staging / target.name, target)
    except OSError as exc:
        raise BitrayError(f"cannot copy {uri!r} to {cache}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def delete(uri: str, storage: StorageConfig | None = None, *, deadline: float | None = None) -> None:
    """Remove one file or object; a missing one is not an error."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        bucket, key = split_bucket(uri)
        with s3_errors(uri, storage):
            s3_request(storage, deadline, lambda c: c.delete_object(Bucket=bucket, Key=key), f"DELETE {uri}")
        return
    fs, path = filesystem_for(uri, storage)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise BitrayError(f"cannot delete {uri!r}: {exc}") from None


def list_names(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """The sorted names directly under a directory or prefix; empty when it does not exist."""
    fs, path = filesystem_for(uri, storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as exc:
        raise BitrayError(f"cannot list {uri!r}: {exc}") from None
    return sorted(info.base_name for info in infos)


def move_file(src: str, dst: str, storage: StorageConfig | None = None) -> bool:
    """Make ``src`` appear whole as ``dst``: a rename locally, a server-side copy then a delete elsewhere.

    Idempotent: True when ``dst`` exists afterwards, False when neither exists (nothing to move). Locally
    an existing ``dst`` is never replaced (a hard link, then the source's name removed): a file another
    writer published under that name stays as it is.
    """
    fs, src_path = filesystem_for(src, storage)
    _, dst_path = filesystem_for(dst, storage)
    try:
        if fs.get_file_info(src_path).type == pafs.FileType.NotFound:
            return fs.get_file_info(dst_path).type != pafs.FileType.NotFound
        if isinstance(fs, pafs.LocalFileSystem):
            Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src_path, dst_path)  # atomic, and exclusive
            except FileExistsError:
                if not os.path.samefile(src_path, dst_path):  # not our own earlier link
                    raise BitrayError(f"cannot publish {src!r}: {dst!r} exists already") from None
            os.unlink(src_path)
        else:
            fs.copy_file(src_path, dst_path)  # a server-side copy: the object appears whole
            fs.delete_file(src_path)
    except OSError as exc:
        raise BitrayError(f"cannot move {src!r} to {dst!r}: {exc}") from None
    return True


def delete_tree(uri: str, storage: StorageConfig | None = None, *, deadline: float | None = None) -> None:
    """Remove a directory or prefix and everything under it (on S3: a LIST and a batched DELETE per
    1,000 keys; nothing else, so no directory markers appear). ``deadline``: each S3 request ends by it."""
    if scheme_of(uri) == "s3":
        storage = storage or StorageConfig()
        bucket, prefix = split_bucket(uri.rstrip("/") + "/")
        page_args: dict = {"Bucket": bucket, "Prefix": prefix}
        with s3_errors(uri, storage):
            while True:
                page = s3_request(storage, deadline, lambda c: c.list_objects_v2(**page_args), f"LIST {uri}")
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    delete = {"Objects": keys, "Quiet": True}
                    s3_request(
                        storage,
                        deadline,
                        lambda c, delete=delete: c.delete_objects(Bucket=bucket, Delete=delete),
                        f"DELETE {uri}",
                    )
                if not page.get("IsTruncated"):
                    break
                page_args["ContinuationToken"] = page["NextContinuationToken"]
        return
    fs, path = filesystem_for(uri, storage)
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise BitrayError(f"cannot delete {uri!r}: {exc}") from None
